"""Competition math (Hendrycks et al., 2021): MATH-500 and the full MATH test split, judged by math-verify.

``math-v0`` trains on MATH's train split (7,500 problems: ``math/train.jsonl``, else the hub dataset
``DigitalLearningGmbH/MATH-lighteval``; not in shared/data) and evaluates on its test split (5,000:
``math/test.jsonl``, else the same hub dataset). Its records have no answer field, so the gold is the last
``\\boxed{...}`` of ``solution``, with nested braces matched.

``math500-v0`` evaluates on MATH-500 (``math500/test.jsonl``, else the hub dataset ``HuggingFaceH4/MATH-500``),
PRM800K's 500-problem subset of MATH's test split, whose records carry an ``answer`` field. It trains on the
other 4,500 problems of MATH's test split (MATH's test minus MATH-500, compared by problem text), which PRM800K
also trained on: they need only files that shared/data has, and share no problem with MATH-500.
``data_files=`` replaces the file of the chosen split (for ``train``, the whole training set).

Each record gains ``gold``. Completions may state the answer in ``\\boxed{}`` or ``<answer></answer>``.
"""

from __future__ import annotations

from typing import Mapping

from dare_gym.envs.base import SplitInfo, TextTaskEnv, leading_fraction
from dare_gym.envs.data import DataFormatError, RecordList, hub_split, load_records, where
from dare_gym.rewards.math import last_boxed

INSTRUCTION = "Solve the problem. Put the final answer inside \\boxed{}."
MATH_HUB = "DigitalLearningGmbH/MATH-lighteval"
MATH_FIELDS = {"problem": str, "solution": str}


def load_math(split: str, data_files=None) -> tuple[list[dict], str]:
    """MATH's ``train`` or ``test`` split (Hendrycks' JSONL layout: problem, solution, level, type)."""
    return load_records(data_files=data_files, relative_path=f"math/{split}.jsonl",
                        hub_loader=hub_split(MATH_HUB, None, split), required_fields=MATH_FIELDS)


def load_math500(data_files=None) -> tuple[list[dict], str]:
    """MATH-500 (problem, solution, answer, subject, level)."""
    return load_records(data_files=data_files, relative_path="math500/test.jsonl",
                        hub_loader=hub_split("HuggingFaceH4/MATH-500", None, "test"),
                        required_fields={**MATH_FIELDS, "answer": (str, int, float)})


class _MathEnv(TextTaskEnv):
    """A math word problem in, a LaTeX answer out, judged by math-verify."""

    default_reward = "math_verify"

    def __init__(self, *, split: str = "train", data_files=None, instruction: str = INSTRUCTION, **common):
        names = tuple(s.name for s in self.splits)
        if split not in names:
            raise ValueError(f"split must be one of {names}, got {split!r}")
        super().__init__(split=split, **common)
        records, self.source = self.load_split(split, data_files)
        for position, record in enumerate(records):
            gold = str(record["answer"]) if "answer" in record else last_boxed(record["solution"])
            if gold is None:
                raise DataFormatError(f"{where(records, position, self.source)}: field 'solution' has no "
                                      "\\boxed{...} answer")
            record["gold"] = gold
        self._records = records
        self.instruction = instruction

    def load_split(self, split: str, data_files) -> tuple[list[dict], str]:
        raise NotImplementedError

    def prompt(self, record: Mapping) -> str:
        return f"{record['problem']}\n{self.instruction}" if self.instruction else str(record["problem"])

    def problem_text(self, record: Mapping) -> str:
        return str(record["problem"])

    def public_info(self, record: Mapping) -> dict:
        subject = record.get("subject", record.get("type"))
        pairs = (("subject", subject), ("level", record.get("level")))
        return {key: value for key, value in pairs if value is not None}


    @staticmethod
    def demonstration(record: Mapping) -> str:
        return str(record["solution"])

    def hint(self, record: Mapping, fraction: float) -> str | None:
        """The first ``fraction`` of the words of the reference ``solution`` (its ``\\boxed`` answer comes last,
        so only ``fraction=1`` gives the answer away)."""
        return leading_fraction(str(record["solution"]), fraction)


class Math500Env(_MathEnv):
    """MATH-500: the 500-problem test subset of MATH used by PRM800K and most dLLM papers."""

    splits = (
        SplitInfo("train", 4500, "MATH test minus MATH-500 (PRM800K trains on these): math/test.jsonl less "
                                 f"math500/test.jsonl, else hub {MATH_HUB} less HuggingFaceH4/MATH-500"),
        SplitInfo("test", 500, "MATH-500: math500/test.jsonl, else hub HuggingFaceH4/MATH-500"),
    )

    def load_split(self, split: str, data_files) -> tuple[list[dict], str]:
        if split == "test":
            return load_math500(data_files)
        if data_files is not None:
            return load_math("train", data_files)  # the user's own training set, taken as it is
        math_test, math_source = load_math("test")
        math500, math500_source = load_math500()
        excluded = {self.fingerprint(record) for record in math500}
        keep = [i for i, record in enumerate(math_test) if self.fingerprint(record) not in excluded]
        lines = [math_test.lines[i] for i in keep] if getattr(math_test, "lines", None) else None
        records = RecordList((math_test[i] for i in keep), source=math_source, lines=lines)
        return records, f"{math_source} less {math500_source}"


class MathEnv(_MathEnv):
    """The full MATH benchmark: train on its 7,500 train problems, evaluate on its 5,000 test problems."""

    splits = (
        SplitInfo("train", 7500, "MATH train: math/train.jsonl (not in shared/data), else hub " + MATH_HUB),
        SplitInfo("test", 5000, "MATH test: math/test.jsonl, else hub " + MATH_HUB),
    )

    def load_split(self, split: str, data_files) -> tuple[list[dict], str]:
        return load_math(split, data_files)
