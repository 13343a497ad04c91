"""reasoning-gym's procedural tasks as envs ``rg/<task>-v0`` (optional extra: ``pip install dare_gym[reasoning-gym]``).

Importing this module registers one env per reasoning-gym dataset (about a hundred); ``dare_gym.make`` imports
it by itself for any ``rg/...`` id. Record ``i`` of a split is item ``i`` of the dataset built with that
split's seed (train and test use different seeds). The completion's answer is the content of the last
``<answer>…</answer>`` (the whole completion if there is none), scored by the dataset's own
``score_answer``; ``correct`` means a full score.

In Gymnasium the ids read ``dare_gym/rg.<task>-v0`` (a Gymnasium id cannot hold a second ``/``).
"""

from __future__ import annotations

from typing import Mapping

from dare_gym.envs.base import SplitInfo, TextTaskEnv
from dare_gym.registry import register_env
from dare_gym.rewards.base import register_reward
from dare_gym.rewards.extract import last_tag_block

try:
    import reasoning_gym
    from reasoning_gym.factory import DATASETS
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("the rg/ envs need reasoning-gym: pip install 'dare_gym[reasoning-gym]'") from error

SPLIT_SEEDS = {"train": 0, "test": 1_000_003}
SPLIT_SIZES = {"train": 10_000, "test": 500}  # some tasks build every item up front, so sizes stay modest
UNSUPPORTED = {"composite"}  # needs a list of datasets to mix: build it with reasoning_gym directly
def extract_answer(completion: str) -> str:
    """The last ``<answer>…</answer>`` block's content (the whole completion if none), in linear time."""
    answer = last_tag_block(completion)
    return (completion if answer is None else answer).strip()


@register_reward("reasoning_gym")
def reasoning_gym_reward(completion: str, sample: Mapping) -> float:
    """The task's own ``score_answer`` on the completion's answer (reasoning-gym scores lie in [0, 1])."""
    score = reasoning_gym.get_score_answer_fn(sample["metadata"]["source_dataset"])
    return float(score(extract_answer(completion), dict(sample)))


class ReasoningGymEnv(TextTaskEnv):
    """A reasoning-gym procedural dataset; ``dataset_kwargs`` set its difficulty options."""

    default_reward = "reasoning_gym"
    splits = (
        SplitInfo("train", SPLIT_SIZES["train"], f"procedural: the task's items for seed {SPLIT_SEEDS['train']}"),
        SplitInfo("test", SPLIT_SIZES["test"], f"procedural: the task's items for seed {SPLIT_SEEDS['test']}"),
    )

    def __init__(self, *, task: str, split: str = "train", size: int | None = None,
                 dataset_kwargs: dict | None = None, **common):
        if split not in SPLIT_SEEDS:
            raise ValueError(f"split must be one of {tuple(SPLIT_SEEDS)}, got {split!r}")
        if task not in DATASETS or task in UNSUPPORTED:
            raise ValueError(f"unknown reasoning-gym task {task!r}")
        super().__init__(split=split, **common)
        self.task = task
        size = size or SPLIT_SIZES[split]
        while True:
            try:
                self.dataset = reasoning_gym.create_dataset(
                    task, seed=SPLIT_SEEDS[split], size=size, **(dataset_kwargs or {})
                )
                break
            except ValueError as error:  # e.g. word_ladder: fewer distinct puzzles exist than asked for
                if "size" not in str(error).lower() or size <= 100:
                    raise
                size //= 10

    @property
    def num_records(self) -> int:
        return len(self.dataset)

    def load_record(self, index: int) -> dict:
        return dict(self.dataset[index])  # reasoning-gym builds items on demand: no list to keep

    def prompt(self, record: Mapping) -> str:
        return f"{record['question']}\nPut the final answer inside <answer></answer>."

    def problem_text(self, record: Mapping) -> str:
        return str(record["question"])

    @staticmethod
    def demonstration(record: Mapping) -> str:
        return f"<answer>{record['answer']}</answer>"


def task_ids() -> list[str]:
    return [f"rg/{name}-v0" for name in sorted(DATASETS) if name not in UNSUPPORTED]


for _name in sorted(DATASETS):
    if _name not in UNSUPPORTED:
        register_env(f"rg/{_name}-v0", "dare_gym.envs.reasoning_gym:ReasoningGymEnv", task=_name)
