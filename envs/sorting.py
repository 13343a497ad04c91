"""Digit sorting: the embedded default task. Procedural, no files, learnable by the tiny model on a CPU.

Prompt ``"sort 583920\\n"``, answer ``"023589"``. There is exactly one right answer and the default reward
gives dense credit, the fraction of digits in place (``char_match``), which is what lets a small policy learn
from the checker alone. ``correct`` means the whole sorted string.

Records are generated from their index, so record ``i`` of a split is the same on every machine. The test
split is held out by construction: a problem belongs to the test split iff a hash of its digits is 0 mod 8,
so no training problem ever appears in it.
"""

from __future__ import annotations

import random
import zlib
from typing import Callable, Mapping

from dare_gym.envs.base import SplitInfo, TextTaskEnv, leading_fraction

TEST_SPLIT_SIZE = 500
SPLITS = ("train", "test")


def _in_test_split(problem: str) -> bool:
    return zlib.crc32(problem.encode()) % 8 == 0


def draw_in_split(seed: str, split: str, draw: Callable[[random.Random], str]) -> str:
    """The first problem ``draw(rng)`` gives, from a generator seeded by ``seed``, that belongs to ``split``: the
    test split holds the problems whose hash is 0 mod 8, the train split all others (disjoint by construction)."""
    rng = random.Random(seed)
    while True:
        problem = draw(rng)
        if _in_test_split(problem) == (split == "test"):
            return problem


def make_problem(index: int, split: str, num_digits: int) -> dict:
    digits = draw_in_split(f"digitsort/{num_digits}/{split}/{index}", split,
                           lambda rng: "".join(rng.choice("0123456789") for _ in range(num_digits)))
    return {"digits": digits, "gold": "".join(sorted(digits))}


class SortingTaskEnv(TextTaskEnv):
    """What the procedural sorting tasks share: prompts ``sort <problem>\n`` showing the record's
    ``problem_field``, exactly one right answer (``gold``), dense ``char_match`` credit by default, and an
    endless train split with a held-out test split of 500 (:func:`draw_in_split`)."""

    default_reward = "char_match"
    problem_field: str  # the record field that holds the problem

    def __init__(self, *, split: str = "train", **common):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        super().__init__(split=split, **common)

    @property
    def num_records(self) -> int | None:
        return TEST_SPLIT_SIZE if self.split == "test" else None

    def prompt(self, record: Mapping) -> str:
        return f"sort {record[self.problem_field]}\n"

    def problem_text(self, record: Mapping) -> str:
        return str(record[self.problem_field])

    def is_correct(self, completion: str, record: Mapping) -> bool:
        return completion.strip() == record["gold"]

    @staticmethod
    def demonstration(record: Mapping) -> str:
        """The gold completion, for supervised fine-tuning."""
        return str(record["gold"])

    def hint(self, record: Mapping, fraction: float) -> str | None:
        """The first ``fraction`` of the gold answer's characters: a sorted answer has no reasoning but itself,
        so a hint is its leading part (the smallest digits, in order)."""
        return leading_fraction(str(record["gold"]), fraction, unit="chars")


class DigitSortEnv(SortingTaskEnv):
    """Sort a string of digits in ascending order."""

    problem_field = "digits"
    splits = (
        SplitInfo("train", None, "procedural: digit strings whose hash is not 0 mod 8, seeded by the record index"),
        SplitInfo("test", TEST_SPLIT_SIZE, "procedural: digit strings whose hash is 0 mod 8 (disjoint from train)"),
    )

    def __init__(self, *, split: str = "train", num_digits: int = 6, **common):
        if not isinstance(num_digits, int) or not 2 <= num_digits <= 64:
            raise ValueError(f"num_digits must be an integer in [2, 64], got {num_digits!r}")
        self.num_digits = num_digits
        super().__init__(split=split, **common)

    def load_record(self, index: int) -> dict:
        return make_problem(index, self.split, self.num_digits)
