"""Code generation: HumanEval (Chen et al., 2021) and MBPP (Austin et al., 2021), judged by running the tests
in the sandbox of :mod:`dare_gym.rewards.sandbox` (one fresh, isolated process per program).

``humaneval-v0`` reads ``data_files=``, else ``$DARE_GYM_DATA_DIR/humaneval/HumanEval.jsonl.gz``, else the hub
dataset ``openai/openai_humaneval``. ``mbpp-v0`` reads ``mbpp/mbpp.jsonl``, else the hub dataset
``google-research-datasets/mbpp`` (config ``full``); its splits follow the official task-id ranges: ``train``
511–974 (the default), ``test`` 11–510, ``prompt`` 1–10 (few-shot examples). HumanEval ships only a test split,
which is also its default: the trainer refuses to train on it unless told to (``allow_eval_overlap``).
A completion may be a function body that continues the prompt (HumanEval style) or a fenced code block.

Records are checked when read: HumanEval's fields are strings; MBPP's ``task_id`` is an integer (or a
string of digits), ``text`` and ``code`` strings, ``test_list`` a non-empty list of assert strings. A record
that breaks this raises :class:`~dare_gym.envs.data.DataFormatError` naming its file, line and field.
"""

from __future__ import annotations

from typing import Mapping

from dare_gym.envs.base import SplitInfo, TextTaskEnv
from dare_gym.envs.data import DataFormatError, ListOf, hub_split, load_records, where

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
            record["task_id"] = _task_id(record["task_id"], where(records, position, self.source))
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
