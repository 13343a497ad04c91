"""GSM8K grade-school math (Cobbe et al., 2021): a question in, a numeric answer out, judged by math-verify.

Splits: ``train`` (the default, 7,473 problems) and ``test`` (1,319, the held-out set), disjoint. Records come
from ``data_files=`` (a JSONL path), else ``$DARE_GYM_DATA_DIR/gsm8k/<split>.jsonl``, else the hub dataset
``openai/gsm8k`` (config ``main``). Each record keeps its fields (``question``, ``answer``, both strings) and
gains ``gold``, the final number after ``####`` with thousands separators removed.
"""

from __future__ import annotations

import re
from typing import Mapping

from dare_gym.envs.base import SplitInfo, TextTaskEnv, leading_fraction
from dare_gym.envs.data import DataFormatError, hub_split, load_records, where
from dare_gym.rewards.math import gsm8k_gold

SPLITS = ("train", "test")
INSTRUCTION = (
    "Solve the problem step by step. Put the final answer, a number, inside <answer></answer> tags."
)


class GSM8KEnv(TextTaskEnv):
    """Grade-school math word problems with a numeric answer."""

    default_reward = "math_verify"
    splits = (
        SplitInfo("train", 7473, "GSM8K train: gsm8k/train.jsonl, else hub openai/gsm8k"),
        SplitInfo("test", 1319, "GSM8K test: gsm8k/test.jsonl, else hub openai/gsm8k"),
    )

    def __init__(self, *, split: str = "train", data_files=None, instruction: str = INSTRUCTION, **common):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        super().__init__(split=split, **common)
        records, self.source = load_records(
            data_files=data_files,
            relative_path=f"gsm8k/{split}.jsonl",
            hub_loader=hub_split("openai/gsm8k", "main", split),
            required_fields={"question": str, "answer": str},
        )
        for position, record in enumerate(records):
            try:
                record["gold"] = gsm8k_gold(record["answer"])
            except ValueError as error:
                raise DataFormatError(f"{where(records, position, self.source)}: field 'answer': {error}") from None
        self._records = records
        self.instruction = instruction

    def prompt(self, record: Mapping) -> str:
        return f"{record['question']}\n{self.instruction}" if self.instruction else str(record["question"])

    def problem_text(self, record: Mapping) -> str:
        return str(record["question"])


    def hint(self, record: Mapping, fraction: float) -> str | None:
        """The first ``fraction`` of the words of the gold rationale: the ``answer`` field before its ``####``
        line, with the calculator annotations (``<<48/2=24>>``) removed, so the hint reads as the model writes."""
        return leading_fraction(rationale(record["answer"]), fraction)


def rationale(answer: str) -> str:
    """GSM8K's worked solution without its final ``#### n`` line and without calculator annotations."""
    reasoning = answer.split("####")[0]
    return re.sub(r"<<[^>]*>>", "", reasoning).strip()
