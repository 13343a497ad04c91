"""The single-turn text task: a Gymnasium env whose observation is a prompt and whose action is a completion.

``reset`` picks a record and returns its prompt; ``step(completion)`` scores the completion with the env's
reward, ends the episode, and reports in ``info`` whether it was ``correct`` and each ``reward_components``
term. The gold answer never appears in ``info``.

A task subclass says where records come from (``num_records`` and ``load_record``), how a record becomes a
prompt, what its default reward is, and what "correct" means. Procedural tasks have no files: record ``i``
is generated from ``i`` (``num_records`` is None for an unbounded training stream).
"""

from __future__ import annotations

from typing import Any, Mapping

import gymnasium

from dare_gym.rewards.base import RewardResult, RewardSpec, resolve_reward
from dare_gym.spaces import UnicodeText

UNBOUNDED_INDEX = 2**31 - 1  # procedural tasks draw indices in [0, this) when none is given
DEFAULT_REWARD_TIMEOUT_S = 60.0  # a reward term running longer scores 0 ("timed out") instead of hanging a run


class TextTaskEnv(gymnasium.Env[str, str]):
    """Base class for single-turn text tasks with a verifiable reward.

    Common keyword arguments of every task: ``split``; ``reward`` (a registered name, a callable, or a
    weighted list; default: the task's own); ``reward_timeout_s`` (a reward term running longer scores 0
    with the reason in ``info["reward_errors"]``; None disables the limit); ``render_mode`` (``"ansi"``).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}
    default_reward: RewardSpec = "exact_match"
    max_prompt_chars = 16_384
    max_completion_chars = 65_536

    def __init__(self, *, split: str = "train", reward: RewardSpec | None = None, render_mode: str | None = None,
                 reward_timeout_s: float | None = DEFAULT_REWARD_TIMEOUT_S):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.split = split
        self.render_mode = render_mode
        self.reward_fn = resolve_reward(self.default_reward if reward is None else reward, timeout_s=reward_timeout_s)
        self._default_reward_fn = resolve_reward(self.default_reward)
        self.observation_space = UnicodeText(self.max_prompt_chars)
        self.action_space = UnicodeText(self.max_completion_chars)
        self._record: dict | None = None
        self._index: int | None = None
        self._last_text = ""

    # ------------------------------------------------------------------ what a task subclass provides
    # A file-backed split keeps its records here (in file order); a procedural one leaves it None and
    # overrides ``load_record`` to generate record i from i.
    _records: list[dict] | None = None

    @property
    def num_records(self) -> int | None:
        """How many records the split has, or None for an unbounded procedural stream."""
        return None if self._records is None else len(self._records)

    def load_record(self, index: int) -> dict:
        """Record ``index`` of the split (file order), gold answer included."""
        if self._records is None:
            raise NotImplementedError(f"{type(self).__name__} must generate its records in load_record")
        return dict(self._records[index])

    def prompt(self, record: Mapping) -> str:
        raise NotImplementedError

    def is_correct(self, completion: str, record: Mapping) -> bool:
        """Whether the completion solves the record; by default, a full score from the default reward."""
        return self._default_reward_fn(completion, record).total >= 1.0

    def public_info(self, record: Mapping) -> dict:
        """Fields safe to show the agent (never the gold answer)."""
        return {}

    # --------------------------------------------------------------------------------- gymnasium API
    def record(self, index: int) -> dict:
        count = self.num_records
        if not isinstance(index, int) or index < 0 or (count is not None and index >= count):
            bound = f"[0, {count})" if count is not None else "a non-negative integer"
            raise IndexError(f"record index must be {bound} for split {self.split!r}, got {index!r}")
        return self.load_record(index)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        options = options or {}
        unknown = set(options) - {"index"}
        if unknown:
            raise ValueError(f"unknown reset option(s) {sorted(unknown)}; supported: ['index']")
        if "index" in options:
            index = int(options["index"])
        else:
            index = int(self.np_random.integers(self.num_records or UNBOUNDED_INDEX))
        self._record = self.record(index)
        self._index = index
        prompt = self.prompt(self._record)
        self._last_text = prompt
        return prompt, {"index": index, "split": self.split, **self.public_info(self._record)}

    def step(self, completion: str) -> tuple[str, float, bool, bool, dict]:
        record, index = self.begin_step(completion)
        result = self.reward_fn(completion, record, self.prompt(record))
        return self.finish_step(completion, record, index, result)

    def begin_step(self, completion: str) -> tuple[dict, int | None]:
        """End the episode and hand back its record (for scoring many envs' completions in one batch)."""
        if self._record is None:
            raise RuntimeError("call reset() before step(): each episode is one prompt and one completion")
        if not isinstance(completion, str):
            raise TypeError(f"the action must be the completion text (str), got {type(completion).__name__}")
        record, index = self._record, self._index
        self._record = None  # the episode ends here
        return record, index

    def finish_step(self, completion: str, record: Mapping, index: int | None, result: RewardResult):
        self._last_text = completion
        return "", float(result.total), True, False, self.step_info(completion, record, index, result)

    def step_info(self, completion: str, record: Mapping, index: int | None, result: RewardResult) -> dict:
        """The ``info`` of a step: correctness, reward components, and whatever went wrong in scoring."""
        errors = dict(result.errors)
        default_score = result.components.get(self.default_reward) if isinstance(self.default_reward, str) else None
        try:
            if type(self).is_correct is TextTaskEnv.is_correct and default_score is not None and not errors:
                correct = default_score >= 1.0  # already computed: don't run the checker (a sandbox, say) twice
            else:
                correct = bool(self.is_correct(completion, record))
        except Exception as error:  # noqa: BLE001 - a checker failure is reported, not raised
            correct = False
            errors["correct"] = f"{type(error).__name__}: {error}"
        info = {"index": index, "correct": correct, "reward_components": dict(result.components)}
        if errors:
            info["reward_errors"] = errors
        if result.not_applicable:
            info["reward_not_applicable"] = list(result.not_applicable)
        return info

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return self._last_text
        return None
