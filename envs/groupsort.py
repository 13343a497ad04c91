"""Group sorting: the embedded task with long completions. Procedural, no files, learnable by the tiny model.

Prompt ``"sort 466 124 610 ... 503\\n"`` (17 groups of 3 digits), answer every group with its digits sorted, in
the same order: ``"466 124 016 ... 035"``, 67 characters, i.e. 67 tokens of the character tokenizer plus EOS.
It is digit sorting (the default task) repeated along a long answer: long enough for samplers to differ in speed
(block caches, parallel decoding) and in what that speed costs, which the 6-token digit sort is not, and local
enough (each answer group depends on one prompt group) that the 0.8M-parameter model learns it in two minutes.

There is exactly one right answer. The default reward is ``char_match`` (the fraction of characters in place),
dense partial credit; ``correct`` means the whole answer.

Records are generated from their index, so record ``i`` of a split is the same on every machine. The test split
is held out by construction, as in digit sorting: a problem belongs to the test split iff a hash of its digits
is 0 mod 8, so no training problem ever appears in it.
"""

from __future__ import annotations

from dare_gym.envs.base import SplitInfo
from dare_gym.envs.sorting import TEST_SPLIT_SIZE, SortingTaskEnv, draw_in_split


def make_problem(index: int, split: str, num_groups: int, group_size: int) -> dict:
    """Record ``index`` of ``split``: the groups as shown in the prompt and the gold answer."""
    text = draw_in_split(f"groupsort/{num_groups}x{group_size}/{split}/{index}", split, lambda rng: " ".join(
        "".join(rng.choice("0123456789") for _ in range(group_size)) for _ in range(num_groups)))
    return {"groups": text, "gold": " ".join("".join(sorted(group)) for group in text.split(" "))}


class GroupSortEnv(SortingTaskEnv):
    """Sort the digits inside each group of a long list of digit groups (17 groups of 3: a 67-character answer).

    ``num_groups`` (1 to 64) and ``group_size`` (2 to 8): every answer is ``num_groups · (group_size + 1) − 1``
    characters.
    """

    problem_field = "groups"
    splits = (
        SplitInfo("train", None, "procedural: digit groups whose hash is not 0 mod 8, seeded by the record index"),
        SplitInfo("test", TEST_SPLIT_SIZE, "procedural: digit groups whose hash is 0 mod 8 (disjoint from train)"),
    )

    def __init__(self, *, split: str = "train", num_groups: int = 17, group_size: int = 3, **common):
        for name, value, low, high in (("num_groups", num_groups, 1, 64), ("group_size", group_size, 2, 8)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        self.num_groups, self.group_size = num_groups, group_size
        super().__init__(split=split, **common)

    @property
    def answer_chars(self) -> int:
        """The length of every gold answer: the groups and the spaces between them."""
        return self.num_groups * (self.group_size + 1) - 1

    def load_record(self, index: int) -> dict:
        return make_problem(index, self.split, self.num_groups, self.group_size)
