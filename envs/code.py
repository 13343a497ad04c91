"""Code generation: HumanEval (Chen et al., 2021) and MBPP (Austin et al., 2021), judged by running the tests
in the sandbox of :mod:`dare_gym.rewards.sandbox` (one fresh, isolated process per program).

``humaneval-v0`` reads ``data_files=``, else ``$DARE_GYM_DATA_DIR/humaneval/HumanEval.jsonl.gz``, else the hub
dataset ``openai/openai_humaneval``. ``mbpp-v0`` reads ``mbpp/mbpp.jsonl``, else the hub dataset
``google-research-datasets/mbpp`` (config ``full``); its splits follow the official task-id ranges: ``train``
511–974 (the default), ``test`` 11–510, ``prompt`` 1–10 (few-shot examples). HumanEval ships only a test split,
which is also its default: the trainer refuses to train on it unless told to (``allow_eval_overlap``).
A completion may be a function body that continues the prompt (HumanEval style) or a fenced code block.

Records are checked when read, so that a record that cannot be judged is an error at once rather than a
silent 0.0 for every completion: HumanEval's fields are strings, ``entry_point`` a name the prompt defines a
function of, ``test`` Python that defines ``check(candidate)``; MBPP's ``task_id`` is an integer (or a string of
digits), ``text`` and ``code`` strings, ``test_list`` a non-empty list of tests, each Python with an ``assert``
(a test without one passes any function), that together call a function the solution must define. A record
that breaks this raises :class:`~dare_gym.envs.data.DataFormatError` naming its file, line, record and field.
"""

from __future__ import annotations

import ast
import re
import warnings
from typing import Mapping

from dare_gym.envs.base import SplitInfo, TextTaskEnv
from dare_gym.envs.data import DataFormatError, ListOf, hub_split, load_records, where
from dare_gym.rewards.code import mbpp_spec

MBPP_SPLITS = {"train": range(511, 975), "test": range(11, 511), "prompt": range(1, 11)}
HUMANEVAL_FIELDS = {"task_id": str, "prompt": str, "entry_point": str, "canonical_solution": str, "test": str}
MBPP_FIELDS = {"task_id": (int, str), "text": str, "code": str, "test_list": ListOf(str, non_empty=True)}
MBPP_OPTIONAL_FIELDS = {"test_setup_code": str, "challenge_test_list": ListOf(str)}


class HumanEvalEnv(TextTaskEnv):
    """Complete a Python function so that its hidden unit tests pass."""

    default_reward = "humaneval"
    splits = (SplitInfo("test", 164, "HumanEval (its only split): humaneval/HumanEval.jsonl.gz, else hub "
                                     "openai/openai_humaneval"),)

    def __init__(self, *, split: str = "test", data_files=None, **common):
        if split != "test":
            raise ValueError(f"split must be 'test' (HumanEval ships one split), got {split!r}")
        super().__init__(split=split, **common)
        self._records, self.source = load_records(
            data_files=data_files, relative_path="humaneval/HumanEval.jsonl.gz",
            hub_loader=hub_split("openai/openai_humaneval", None, "test"),
            required_fields=HUMANEVAL_FIELDS,
        )
        for position, record in enumerate(self._records):
            _check_humaneval(record, where(self._records, position, self.source))

    def prompt(self, record: Mapping) -> str:
        return ("Complete the following Python function. Reply with the function body, or the whole function "
                f"in a ```python block.\n```python\n{record['prompt']}```\n")

    def public_info(self, record: Mapping) -> dict:
        return {"task_id": record["task_id"], "entry_point": record["entry_point"]}

    def problem_text(self, record: Mapping) -> str:
        return str(record["prompt"])

    @staticmethod
    def demonstration(record: Mapping) -> str:
        return str(record["canonical_solution"])


class MBPPEnv(TextTaskEnv):
    """Write a Python function from a one-line description; its asserts must pass."""

    default_reward = "mbpp"
    splits = tuple(SplitInfo(name, len(ids), f"MBPP task_ids {ids.start}-{ids.stop - 1}: mbpp/mbpp.jsonl, else hub "
                             "google-research-datasets/mbpp (full)") for name, ids in MBPP_SPLITS.items())

    def __init__(self, *, split: str = "train", data_files=None, **common):
        if split not in MBPP_SPLITS:
            raise ValueError(f"split must be one of {tuple(MBPP_SPLITS)}, got {split!r}")
        super().__init__(split=split, **common)
        records, self.source = load_records(
            data_files=data_files, relative_path="mbpp/mbpp.jsonl",
            hub_loader=hub_split("google-research-datasets/mbpp", "full", "train+validation+test+prompt"),
            required_fields=MBPP_FIELDS, optional_fields=MBPP_OPTIONAL_FIELDS,
        )
        for position, record in enumerate(records):
            location = where(records, position, self.source)
            record["task_id"] = _task_id(record["task_id"], location)
            _check_mbpp(record, location)
        wanted = MBPP_SPLITS[split]
        self._records = sorted((r for r in records if r["task_id"] in wanted), key=lambda r: r["task_id"])
        if not self._records:
            raise DataFormatError(f"{self.source}: no records with task_id in {wanted.start}..{wanted.stop - 1} "
                                  f"(split {split!r})")

    def prompt(self, record: Mapping) -> str:
        return (f"{record['text']}\nYour code should pass this test:\n{record['test_list'][0]}\n"
                "Reply with the code in a ```python block.\n")

    def public_info(self, record: Mapping) -> dict:
        return {"task_id": int(record["task_id"])}

    def problem_text(self, record: Mapping) -> str:
        return f"{record['text']}\n{record['test_list'][0]}"  # what the prompt shows of the problem

    @staticmethod
    def demonstration(record: Mapping) -> str:
        return f"```python\n{record['code']}\n```"


def _task_id(value: int | str, location: str) -> int:
    """MBPP's task id as an int; a string of digits is accepted (some exports write ids as text)."""
    if isinstance(value, str):
        if not value.strip().isdigit():
            raise DataFormatError(f"{location}: field 'task_id' must be an integer, got str {value!r}")
        return int(value)
    return value


def _parse(code: str, field: str, location: str) -> ast.Module:
    try:
        with warnings.catch_warnings():  # old escapes like "\w" in the datasets' code are not our warnings
            warnings.simplefilter("ignore")
            return ast.parse(code.replace("\r\n", "\n").strip())
    except (SyntaxError, ValueError) as error:
        line = f", line {error.lineno}" if getattr(error, "lineno", None) else ""
        raise DataFormatError(f"{location}: field {field!r} is not Python ({getattr(error, 'msg', error)}{line}): "
                              f"{code.strip()[:60]!r}") from None


def _check_humaneval(record: Mapping, location: str) -> None:
    """The record can be judged: its entry point is a function the prompt defines, its test defines check()."""
    entry_point = record["entry_point"]
    if not entry_point.isidentifier():
        raise DataFormatError(f"{location}: field 'entry_point' must be a Python name, got {entry_point!r}")
    if not re.search(rf"(?m)^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", record["prompt"]):
        raise DataFormatError(f"{location}: field 'entry_point': the prompt defines no function {entry_point!r}")
    test = _parse(record["test"], "test", location)
    if not any(isinstance(node, ast.FunctionDef) and node.name == "check" for node in test.body):
        raise DataFormatError(f"{location}: field 'test' defines no check(candidate) function: nothing would "
                              "call the completion")


def _check_mbpp(record: Mapping, location: str) -> None:
    """Every test parses and asserts something, and the tests call a function the solution must define."""
    for field in ("test_list", "challenge_test_list"):
        for index, test in enumerate(record.get(field) or []):
            tree = _parse(test, f"{field}[{index}]", location)
            if not any(isinstance(node, ast.Assert) for node in ast.walk(tree)):
                raise DataFormatError(f"{location}: field '{field}[{index}]' has no assert, so any function would "
                                      f"pass it: {test.strip()[:60]!r}")
    _parse(record.get("test_setup_code") or "", "test_setup_code", location)
    if not mbpp_spec(record).functions:
        raise DataFormatError(f"{location}: field 'test_list': the asserts call no function the solution must "
                              "define, so any code would pass them")
