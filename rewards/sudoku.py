"""The 4×4 Sudoku reward, as d1 scores it: partial credit for the empty cells filled correctly.

The answer is the digits inside the last ``<answer>…</answer>`` (all of the completion if there is none),
padded with zeros or cut to 16, read row-major. The reward is the fraction of the puzzle's empty cells
(``0`` in ``sample["puzzle"]``) whose digit equals ``sample["solution"]``; a completion is correct when the
whole grid equals the (unique) solution.
"""

from __future__ import annotations

from typing import Mapping

from dare_gym.rewards.base import register_reward
from dare_gym.rewards.extract import first_ascii_digits, last_tag_block

CELLS = 16


def answer_grid(completion: str) -> str:
    """The 16-digit grid a completion states (zeros where it gives too few digits)."""
    answer = last_tag_block(completion)
    digits = first_ascii_digits(completion if answer is None else answer, CELLS)
    return digits + "0" * (CELLS - len(digits))


@register_reward("sudoku", linear_time=True)
def sudoku_reward(completion: str, sample: Mapping) -> float:
    """Fraction of the puzzle's empty cells that the completion fills with the solution's digit (d1)."""
    puzzle, solution = str(sample["puzzle"]), str(sample["solution"])
    empty = [i for i, cell in enumerate(puzzle) if cell == "0"]
    if not empty:
        return 1.0
    grid = answer_grid(completion)
    return sum(grid[i] == solution[i] for i in empty) / len(empty)
