"""GSM8K grade-school math (Cobbe et al., 2021): a question in, a numeric answer out, judged by math-verify.

Records come from ``data_files=`` (a JSONL path), else ``$DARE_GYM_DATA_DIR/gsm8k/<split>.jsonl``, else the
hub dataset ``openai/gsm8k`` (config ``main``). Each record keeps its fields (``question``, ``answer``) and
gains ``gold``, the final number after ``####`` with thousands separators removed.
"""

from __future__ import annotations

from typing import Mapping

from dare_gym.envs.base import TextTaskEnv
from dare_gym.envs.data import hub_split, load_records
from dare_gym.rewards.math import answers_match, extract_final_answer, gsm8k_gold

SPLITS = ("train", "test")
INSTRUCTION = (
    "Solve the problem step by step. Put the final answer, a number, inside <answer></answer> tags."
)


class GSM8KEnv(TextTaskEnv):
    default_reward = "math_verify"

    def __init__(self, *, split: str = "test", data_files=None, instruction: str = INSTRUCTION, **common):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        super().__init__(split=split, **common)
        records, self.source = load_records(
            data_files=data_files,
            relative_path=f"gsm8k/{split}.jsonl",
            hub_loader=hub_split("openai/gsm8k", "main", split),
            required_fields=("question", "answer"),
        )
        for number, record in enumerate(records, start=1):
            try:
                record["gold"] = gsm8k_gold(record["answer"])
            except ValueError as error:
                raise ValueError(f"{self.source}: record {number}: {error}") from None
        self._records = records
        self.instruction = instruction

    def prompt(self, record: Mapping) -> str:
        return f"{record['question']}\n{self.instruction}" if self.instruction else str(record["question"])

    def is_correct(self, completion: str, record: Mapping) -> bool:
        prediction = extract_final_answer(completion)
        return prediction is not None and answers_match(record["gold"], prediction)
