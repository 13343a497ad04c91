"""Competition math (Hendrycks et al., 2021): MATH-500 and the full MATH test split, judged by math-verify.

``math500-v0`` reads ``data_files=``, else ``$DARE_GYM_DATA_DIR/math500/test.jsonl``, else the hub dataset
``HuggingFaceH4/MATH-500``; its records carry an ``answer`` field. ``math-v0`` (the full 5,000-problem test
split) reads ``math/test.jsonl``, else the hub dataset ``DigitalLearningGmbH/MATH-lighteval``; its records
have no answer field, so the gold is the last ``\\boxed{...}`` of ``solution``, with nested braces matched.
Each record gains ``gold``. Completions may state the answer in ``\\boxed{}`` or ``<answer></answer>``.
"""

from __future__ import annotations

from typing import Mapping

from dare_gym.envs.base import TextTaskEnv
from dare_gym.envs.data import hub_split, load_records
from dare_gym.rewards.math import answers_match, extract_final_answer, last_boxed

INSTRUCTION = "Solve the problem. Put the final answer inside \\boxed{}."


class _MathEnv(TextTaskEnv):
    """A math word problem in, a LaTeX answer out, judged by math-verify."""

    default_reward = "math_verify"
    relative_path = ""
    hub: tuple[str, str | None] = ("", None)
    required_fields: tuple[str, ...] = ("problem", "solution")

    def __init__(self, *, split: str = "test", data_files=None, instruction: str = INSTRUCTION, **common):
        if split != "test":
            raise ValueError(f"split must be 'test' (the only split this task ships), got {split!r}")
        super().__init__(split=split, **common)
        records, self.source = load_records(
            data_files=data_files, relative_path=self.relative_path,
            hub_loader=hub_split(*self.hub, split), required_fields=self.required_fields,
        )
        for number, record in enumerate(records, start=1):
            gold = self.gold_of(record)
            if gold is None:
                raise ValueError(f"{self.source}: record {number} has no \\boxed{{...}} answer in its solution")
            record["gold"] = gold
        self._records = records
        self.instruction = instruction

    @staticmethod
    def gold_of(record: Mapping) -> str | None:
        return last_boxed(record["solution"])

    def prompt(self, record: Mapping) -> str:
        return f"{record['problem']}\n{self.instruction}" if self.instruction else str(record["problem"])

    def public_info(self, record: Mapping) -> dict:
        subject = record.get("subject", record.get("type"))
        return {key: value for key, value in (("subject", subject), ("level", record.get("level"))) if value is not None}

    def is_correct(self, completion: str, record: Mapping) -> bool:
        prediction = extract_final_answer(completion)
        return prediction is not None and answers_match(record["gold"], prediction)

    @staticmethod
    def demonstration(record: Mapping) -> str:
        return str(record["solution"])


class Math500Env(_MathEnv):
    """MATH-500: the 500-problem test subset of MATH used by PRM800K and most dLLM papers."""

    relative_path = "math500/test.jsonl"
    hub = ("HuggingFaceH4/MATH-500", None)
    required_fields = ("problem", "solution", "answer")

    @staticmethod
    def gold_of(record: Mapping) -> str | None:
        return str(record["answer"])


class MathEnv(_MathEnv):
    """The full MATH test split (5,000 problems); the gold is the last boxed answer of the solution."""

    relative_path = "math/test.jsonl"
    hub = ("DigitalLearningGmbH/MATH-lighteval", None)
