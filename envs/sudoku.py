"""4×4 Sudoku (d1's planning task): fill the grid so that every row, column and 2×2 box holds 1–4.

``split="train"`` is procedural: record ``i`` is a random complete grid with cells removed, one at a time in
random order, while the solution stays unique (checked by an exhaustive solver), down to ``min_clues`` given
cells. ``split="test"`` reads d1's ``4x4_test_sudoku.csv`` (``data_files=`` or
``$DARE_GYM_DATA_DIR/d1/4x4_test_sudoku.csv``) as strings, so leading zeros survive. Grids are 16-character
row-major strings with ``0`` for an empty cell. The reward gives d1's partial credit (see
:mod:`dare_gym.rewards.sudoku`); ``correct`` means the completion's grid is the solution. A problem is its
puzzle grid: the trainer holds the test puzzles out of the procedural training stream.
"""

from __future__ import annotations

import csv
import random
from typing import Mapping

from dare_gym.envs.base import SplitInfo, TextTaskEnv
from dare_gym.envs.data import DataFormatError, require_local_file, text_lines
from dare_gym.rewards.sudoku import answer_grid

SPLITS = ("train", "test")
SIZE, BOX = 4, 2
_UNITS = (
    [[r * SIZE + c for c in range(SIZE)] for r in range(SIZE)]
    + [[r * SIZE + c for r in range(SIZE)] for c in range(SIZE)]
    + [[(br + r) * SIZE + bc + c for r in range(BOX) for c in range(BOX)] for br in (0, 2) for bc in (0, 2)]
)
_PEERS = [sorted({p for unit in _UNITS if i in unit for p in unit} - {i}) for i in range(SIZE * SIZE)]


def count_solutions(grid: str, limit: int = 2) -> int:
    """Number of completions of ``grid`` (stops counting at ``limit``)."""
    cells = list(grid)
    try:
        empty = cells.index("0")
    except ValueError:
        return 1
    total = 0
    taken = {cells[p] for p in _PEERS[empty]}
    for digit in "1234":
        if digit not in taken:
            cells[empty] = digit
            total += count_solutions("".join(cells), limit - total)
            if total >= limit:
                break
    return total


def is_valid_solution(grid: str, puzzle: str) -> bool:
    """A full grid that keeps the puzzle's givens and satisfies every row, column and box."""
    if len(grid) != SIZE * SIZE or any(p != "0" and p != g for p, g in zip(puzzle, grid)):
        return False
    return all(sorted(grid[i] for i in unit) == list("1234") for unit in _UNITS)


def _random_full_grid(rng: random.Random) -> str:
    cells = ["0"] * 16
    order = list(range(16))

    def fill(position: int) -> bool:
        if position == 16:
            return True
        cell = order[position]
        digits = list("1234")
        rng.shuffle(digits)
        for digit in digits:
            if digit not in {cells[p] for p in _PEERS[cell]}:
                cells[cell] = digit
                if fill(position + 1):
                    return True
        cells[cell] = "0"
        return False

    fill(0)
    return "".join(cells)


def make_puzzle(index: int, min_clues: int) -> dict:
    rng = random.Random(f"sudoku4/{min_clues}/{index}")
    solution = _random_full_grid(rng)
    puzzle = list(solution)
    positions = list(range(16))
    rng.shuffle(positions)
    for position in positions:
        if sum(c != "0" for c in puzzle) <= min_clues:
            break
        kept = puzzle[position]
        puzzle[position] = "0"
        if count_solutions("".join(puzzle)) != 1:
            puzzle[position] = kept
    return {"puzzle": "".join(puzzle), "solution": solution}


class Sudoku4Env(TextTaskEnv):
    """Solve a 4×4 Sudoku with a unique solution."""

    default_reward = "sudoku"
    splits = (
        SplitInfo("train", None, "procedural: unique-solution puzzles with min_clues (default 6) givens"),
        SplitInfo("test", 500, "d1's puzzles: d1/4x4_test_sudoku.csv (no hub copy)"),
    )

    def __init__(self, *, split: str = "train", min_clues: int = 6, data_files=None, **common):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(min_clues, int) or not 4 <= min_clues <= 15:
            raise ValueError(f"min_clues must be an integer in [4, 15], got {min_clues!r}")
        super().__init__(split=split, **common)
        self.min_clues = min_clues
        if split == "test":
            path = require_local_file(data_files, "d1/4x4_test_sudoku.csv", "sudoku's test split (d1's)")
            self._records = self._read_csv(path)
            self.source = str(path)

    @staticmethod
    def _read_csv(path) -> list[dict]:
        """``Puzzle,Solution`` rows read as strings (leading zeros survive); a malformed row, bytes that are
        not UTF-8 or a wrong compression raise :class:`DataFormatError` naming the line."""
        records = []
        reader = csv.DictReader(line for _, line in text_lines(path))
        if reader.fieldnames is None or not {"Puzzle", "Solution"} <= set(reader.fieldnames):
            raise DataFormatError(f"{path}:1: expected a header with Puzzle and Solution, got {reader.fieldnames}")
        for row in reader:
            for field in ("Puzzle", "Solution"):
                value = (row[field] or "").strip()
                if not (len(value) == 16 and value.isdigit() and value.isascii()):
                    raise DataFormatError(f"{path}:{reader.line_num}: field {field!r} must be a 16-digit grid, "
                                          f"got {row[field]!r}")
            records.append({"puzzle": row["Puzzle"].strip(), "solution": row["Solution"].strip()})
        return records

    def load_record(self, index: int) -> dict:
        if self._records is not None:
            return super().load_record(index)
        return make_puzzle(index, self.min_clues)

    def prompt(self, record: Mapping) -> str:
        rows = "\n".join(record["puzzle"][r * 4 : r * 4 + 4] for r in range(4))
        return (f"Solve this 4x4 Sudoku. Each row, column and 2x2 box must contain the digits 1-4; 0 marks an "
                f"empty cell.\n{rows}\nGive the full grid as 16 digits, row by row, inside <answer></answer>.")

    def public_info(self, record: Mapping) -> dict:
        return {"puzzle": record["puzzle"]}

    def problem_text(self, record: Mapping) -> str:
        return str(record["puzzle"])

    def is_correct(self, completion: str, record: Mapping) -> bool:
        return is_valid_solution(answer_grid(completion), record["puzzle"])

    @staticmethod
    def demonstration(record: Mapping) -> str:
        return f"<answer>{record['solution']}</answer>"
