"""Countdown: combine the given numbers with + - * / to reach a target (d1's and TinyZero's reasoning task).

``split="train"`` is procedural: record ``i`` draws 3 or 4 numbers (``num_numbers``) in [1, 99] and a target
that some expression over all of them reaches (a random expression tree with positive integer intermediate
values), seeded by ``i``. ``split="test"`` reads d1's ``countdown_cd3_test.jsonl`` (``data_files=`` or
``$DARE_GYM_DATA_DIR/d1/countdown_cd3_test.jsonl``; 256 three-number problems; no hub copy exists). Records
are ``{"numbers": [...], "target": int}``; the reward is :func:`dare_gym.rewards.countdown.countdown_reward`.
A problem is its multiset of numbers and its target: the trainer holds the test problems out of the
procedural training stream (which would otherwise draw about 4% of them in 100,000 problems).
"""

from __future__ import annotations

import random
from typing import Mapping

from dare_gym.envs.base import SplitInfo, TextTaskEnv
from dare_gym.envs.data import DataFormatError, read_jsonl, require_local_file, where
from dare_gym.rewards.countdown import countdown_solves

SPLITS = ("train", "test")
MAX_TARGET = 1000


def _random_expression(rng: random.Random, numbers: list[int]) -> tuple[str, int] | None:
    """A random expression over all of ``numbers`` whose every intermediate value is a positive integer."""
    items = [(str(n), n) for n in numbers]
    rng.shuffle(items)
    while len(items) > 1:
        (left_text, left), (right_text, right) = items.pop(), items.pop()
        options = [("+", left + right), ("*", left * right)]
        if left > right:
            options.append(("-", left - right))
        if right and left % right == 0:
            options.append(("/", left // right))
        symbol, value = rng.choice(options)
        items.append((f"({left_text} {symbol} {right_text})", value))
        rng.shuffle(items)
    text, value = items[0]
    return (text[1:-1] if text.startswith("(") else text, value) if 0 < value <= MAX_TARGET else None


def make_problem(index: int, num_numbers: int) -> dict:
    rng = random.Random(f"countdown/{num_numbers}/{index}")
    while True:
        numbers = [rng.randint(1, 99) for _ in range(num_numbers)]
        found = _random_expression(rng, numbers)
        if found is not None:
            expression, target = found
            return {"numbers": numbers, "target": target, "solution": expression}


class CountdownEnv(TextTaskEnv):
    """Reach a target number with the given numbers, each used once, and + - * /."""

    default_reward = "countdown"
    splits = (
        SplitInfo("train", None, "procedural: 3 or 4 numbers in [1, 99], seeded by the record index"),
        SplitInfo("test", 256, "d1's 3-number problems: d1/countdown_cd3_test.jsonl (no hub copy)"),
    )

    def __init__(self, *, split: str = "train", num_numbers: int | None = None, data_files=None, **common):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if num_numbers not in (None, 3, 4):
            raise ValueError(f"num_numbers must be 3, 4 or None (either), got {num_numbers!r}")
        super().__init__(split=split, **common)
        self.num_numbers = num_numbers
        if split == "test":
            path = require_local_file(data_files, "d1/countdown_cd3_test.jsonl", "countdown's test split (d1's)")
            records = read_jsonl(path)
            self._records = [self._parse_test_record(record, where(records, n)) for n, record in enumerate(records)]
            self.source = str(path)

    @staticmethod
    def _parse_test_record(record: dict, location: str) -> dict:
        """d1's ``{"input": "30,100,93", "output": "23"}`` as ``{"numbers": [30, 100, 93], "target": 23}``."""
        fields = {"input": "comma-separated integers like '30,100,93'", "output": "an integer like '23'"}
        missing = [name for name in fields if name not in record]
        if missing:
            raise DataFormatError(f"{location} lacks field(s) {missing}; it has {sorted(record)}")
        parsed = {}
        for name, many in (("input", True), ("output", False)):
            try:
                parsed[name] = _parse_int_text(record[name], many=many)
            except ValueError:
                message = f"{location}: field {name!r} must be {fields[name]}, got {record[name]!r}"
                raise DataFormatError(message) from None
        return {"numbers": parsed["input"], "target": parsed["output"]}

    def load_record(self, index: int) -> dict:
        if self._records is not None:
            return super().load_record(index)
        count = self.num_numbers or (3 if index % 2 == 0 else 4)
        return make_problem(index, count)

    def prompt(self, record: Mapping) -> str:
        numbers = ", ".join(str(n) for n in record["numbers"])
        return (f"Using the numbers [{numbers}], write an expression that equals {record['target']}. Use each "
                f"number exactly once and only + - * / and parentheses. Put the expression inside "
                f"<answer></answer>, for example <answer>(1 + 2) * 3</answer>.")

    def public_info(self, record: Mapping) -> dict:
        return {"numbers": list(record["numbers"]), "target": int(record["target"])}

    def problem_text(self, record: Mapping) -> str:
        return f"{sorted(int(n) for n in record['numbers'])} -> {int(record['target'])}"

    @staticmethod
    def demonstration(record: Mapping) -> str:
        if "solution" not in record:
            raise KeyError("test records carry no solution expression")
        return f"<answer>{record['solution']}</answer>"


def _parse_int_text(value, *, many: bool):
    """Integers written as text, as d1 stores them (one, or comma-separated when ``many``); an int is
    accepted for one. Anything else (a bool, a float, a list, words) raises ValueError."""
    if not many and isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ValueError(value)
    numbers = [int(part) for part in value.split(",")]
    if not many and len(numbers) != 1:
        raise ValueError(value)
    return numbers if many else numbers[0]


def check_solution(record: Mapping) -> bool:
    """Whether a generated record's stored solution really solves it (used by the tests)."""
    return countdown_solves(record["solution"], list(record["numbers"]), int(record["target"]))
