"""Code generation: HumanEval (Chen et al., 2021) and MBPP (Austin et al., 2021), judged by running the tests
in the sandbox of :mod:`dare_gym.rewards.sandbox` (one fresh, isolated process per program).

``humaneval-v0`` reads ``data_files=``, else ``$DARE_GYM_DATA_DIR/humaneval/HumanEval.jsonl.gz``, else the hub
dataset ``openai/openai_humaneval``. ``mbpp-v0`` reads ``mbpp/mbpp.jsonl``, else the hub dataset
``google-research-datasets/mbpp`` (config ``full``); its splits follow the official task-id ranges: ``test`` is
11–510, ``prompt`` 1–10 (few-shot examples), ``train`` 511–974. A completion may be a function body that
continues the prompt (HumanEval style) or a fenced code block.
"""

from __future__ import annotations

from typing import Mapping

from dare_gym.envs.base import TextTaskEnv
from dare_gym.envs.data import hub_split, load_records

MBPP_SPLITS = {"prompt": range(1, 11), "test": range(11, 511), "train": range(511, 975)}


class HumanEvalEnv(TextTaskEnv):
    """Complete a Python function so that its hidden unit tests pass."""

    default_reward = "humaneval"

    def __init__(self, *, split: str = "test", data_files=None, **common):
        if split != "test":
            raise ValueError(f"split must be 'test' (HumanEval ships one split), got {split!r}")
        super().__init__(split=split, **common)
        self._records, self.source = load_records(
            data_files=data_files, relative_path="humaneval/HumanEval.jsonl.gz",
            hub_loader=hub_split("openai/openai_humaneval", None, "test"),
            required_fields=("task_id", "prompt", "entry_point", "canonical_solution", "test"),
        )

    def prompt(self, record: Mapping) -> str:
        return ("Complete the following Python function. Reply with the function body, or the whole function "
                f"in a ```python block.\n```python\n{record['prompt']}```\n")

    def public_info(self, record: Mapping) -> dict:
        return {"task_id": record["task_id"], "entry_point": record["entry_point"]}

    @staticmethod
    def demonstration(record: Mapping) -> str:
        return str(record["canonical_solution"])


class MBPPEnv(TextTaskEnv):
    """Write a Python function from a one-line description; its asserts must pass."""

    default_reward = "mbpp"

    def __init__(self, *, split: str = "test", data_files=None, **common):
        if split not in MBPP_SPLITS:
            raise ValueError(f"split must be one of {tuple(MBPP_SPLITS)}, got {split!r}")
        super().__init__(split=split, **common)
        records, self.source = load_records(
            data_files=data_files, relative_path="mbpp/mbpp.jsonl",
            hub_loader=hub_split("google-research-datasets/mbpp", "full", "train+validation+test+prompt"),
            required_fields=("task_id", "text", "code", "test_list"),
        )
        wanted = MBPP_SPLITS[split]
        self._records = sorted((r for r in records if int(r["task_id"]) in wanted), key=lambda r: int(r["task_id"]))
        if not self._records:
            raise ValueError(f"{self.source}: no records with task_id in {wanted.start}..{wanted.stop - 1}")

    def prompt(self, record: Mapping) -> str:
        return (f"{record['text']}\nYour code should pass this test:\n{record['test_list'][0]}\n"
                "Reply with the code in a ```python block.\n")

    def public_info(self, record: Mapping) -> dict:
        return {"task_id": int(record["task_id"])}

    @staticmethod
    def demonstration(record: Mapping) -> str:
        return f"```python\n{record['code']}\n```"
