"""The single-turn text task: a Gymnasium env whose observation is a prompt and whose action is a completion.

``reset`` picks a record and returns its prompt; ``step(completion)`` scores the completion with the env's
reward, ends the episode, and reports in ``info`` whether it was ``correct`` and each ``reward_components``
term. The gold answer never appears in ``info``.

A task subclass says where records come from (``num_records`` and ``load_record``), how a record becomes a
prompt, what its default reward is, and what "correct" means. Procedural tasks have no files: record ``i``
is generated from ``i`` (``num_records`` is None for an unbounded training stream).

Splits: every task declares its splits (:class:`SplitInfo`: name, size, source) for ``dare-gym envs``;
training uses the constructor's default split (``train`` wherever the task has one) and evaluation the
``test`` split. A record's :meth:`~TextTaskEnv.fingerprint` (a hash of its problem text) lets the trainer
prove the two disjoint (:mod:`dare_gym.envs.splits`), and :meth:`~TextTaskEnv.hold_out` keeps a procedural
training stream from ever drawing an evaluation problem.

Actions: a completion longer than the action space's ``max_length`` is truncated to it before scoring (so a
reward never sees unbounded text) and ``info["action_truncated"]`` says so.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Collection, Mapping, NamedTuple, Sequence

import gymnasium
import numpy as np

from dare_gym.rewards.base import RewardResult, RewardSpec, resolve_reward
from dare_gym.spaces import UnicodeText

UNBOUNDED_INDEX = 2**31 - 1  # procedural tasks draw indices in [0, this) when none is given
DEFAULT_REWARD_TIMEOUT_S = 60.0  # a reward term running longer scores 0 ("timed out") instead of hanging a run
MAX_HELD_OUT_REDRAWS = 10_000  # a draw landing on a held-out record is redrawn at most this many times


@dataclass(frozen=True)
class SplitInfo:
    """One split of a task, as ``dare-gym envs`` lists it."""

    name: str
    size: int | None  # None: an unbounded procedural stream
    source: str  # where its records come from


def describe_splits(env_class: type["TextTaskEnv"]) -> list[str]:
    """One line per split of a task: name, role (the default split trains, ``eval_split`` is held out),
    size and source, as ``dare-gym envs`` prints them."""
    default, held_out = env_class.default_split(), env_class.eval_split
    lines = []
    for split in env_class.splits:
        roles = [role for role, applies in (("default", split.name == default), ("held out", split.name == held_out))
                 if applies]
        size = "unbounded" if split.size is None else f"{split.size:,}"
        label = f"{split.name} ({', '.join(roles)})" if roles else split.name
        lines.append(f"{label:<26} {size:>9}  {split.source}")
    return lines


def fingerprint_text(text: str) -> str:
    """A short, stable hash of a problem's text with whitespace runs collapsed: the same problem gives the
    same fingerprint whichever file or split it was read from."""
    return hashlib.sha256(" ".join(str(text).split()).encode("utf-8")).hexdigest()[:16]


def check_fraction(fraction) -> float:
    """``fraction`` if it is a number in [0, 1], else an error naming it."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"a hint fraction must be a number in [0, 1], got {fraction!r}")
    return float(fraction)


def leading_fraction(text: str, fraction: float, *, unit: str = "words") -> str:
    """The first ``fraction`` of ``text``: of its whitespace-separated words (``unit="words"``, cut at a word
    boundary, the original spacing kept) or of its characters (``unit="chars"``), rounded up, so any positive
    fraction gives at least one unit and 1 gives the whole text."""
    fraction = check_fraction(fraction)
    if unit == "chars":
        return text[:math.ceil(fraction * len(text))]
    if unit != "words":
        raise ValueError(f"unit must be 'words' or 'chars', got {unit!r}")
    words = list(re.finditer(r"\S+", text))
    keep = math.ceil(fraction * len(words))
    return text[:words[keep - 1].end()] if keep else ""


class PendingStep(NamedTuple):
    """An episode that ``begin_step`` ended and ``finish_step`` will report: its record, index, the
    completion as scored (truncated to the action space) and notes for ``info``."""

    record: dict
    index: int | None
    completion: str
    notes: dict


class TextTaskEnv(gymnasium.Env[str, str]):
    """Base class for single-turn text tasks with a verifiable reward.

    Common keyword arguments of every task: ``split``; ``reward`` (a registered name, a callable, or a
    weighted list; default: the task's own); ``reward_timeout_s`` (a reward term running longer scores 0
    with the reason in ``info["reward_errors"]``; None disables the limit); ``render_mode`` (``"ansi"``).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}
    default_reward: RewardSpec = "exact_match"
    splits: tuple[SplitInfo, ...] = ()  # for `dare-gym envs`; the constructor's `split` default trains
    eval_split = "test"  # the held-out split the trainer evaluates on by default
    max_prompt_chars = 16_384
    max_completion_chars = 65_536

    def __init__(self, *, split: str = "train", reward: RewardSpec | None = None, render_mode: str | None = None,
                 reward_timeout_s: float | None = DEFAULT_REWARD_TIMEOUT_S):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.split = split
        self.render_mode = render_mode
        self.reward_fn = resolve_reward(self.default_reward if reward is None else reward, timeout_s=reward_timeout_s)
        self._default_reward_fn = resolve_reward(self.default_reward, timeout_s=reward_timeout_s)
        self.observation_space = UnicodeText(self.max_prompt_chars)
        self.action_space = UnicodeText(self.max_completion_chars)
        self._record: dict | None = None
        self._index: int | None = None
        self._last_text = ""
        self._held_out: frozenset[str] = frozenset()

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

    def problem_text(self, record: Mapping) -> str:
        """The text that identifies the problem, without the task's instruction (default: the prompt)."""
        return self.prompt(record)

    def demonstration(self, record: Mapping) -> str:
        """A gold completion for the record (behaviour cloning); envs that have one override this."""
        raise NotImplementedError(f"{type(self).__name__} has no demonstrations (gold completions) to clone")

    def hint(self, record: Mapping, fraction: float) -> str | None:
        """The first ``fraction`` (in [0, 1]) of the record's reference reasoning, the partial gold solution an
        inpainting method (IGPO) writes into a completion, or None where the task has none (the default). Each
        task decides what its reasoning is and how it is cut (:func:`leading_fraction`); ``fraction=1`` is the
        whole of it. Never shown to the agent by the env itself."""
        check_fraction(fraction)
        return None

    def score_texts(self, index: int, completions: Sequence[str]) -> list[float]:
        """The reward of each of several completions of record ``index``, in one reward batch (MDPO scores the
        sampler's intermediate guesses this way)."""
        record = self.record(index)
        prompt = self.prompt(record)
        results = self.reward_fn.score_many(list(completions), [record] * len(completions),
                                            [prompt] * len(completions))
        return [result.total for result in results]

    # ------------------------------------------------------------------------ splits and held-out sets
    @classmethod
    def default_split(cls) -> str:
        """The split the constructor reads when none is given (the training split)."""
        return inspect.signature(cls.__init__).parameters["split"].default

    @property
    def procedural(self) -> bool:
        """Whether records are generated from their index rather than read from a file."""
        return self._records is None

    def fingerprint(self, record: Mapping) -> str:
        """A hash of the record's problem text (:func:`fingerprint_text`), equal for equal problems."""
        return fingerprint_text(self.problem_text(record))

    def fingerprints(self, limit: int | None = None) -> dict[str, int]:
        """Fingerprint -> index of the first ``limit`` records (all of a finite split by default)."""
        count = self.num_records
        if count is None and limit is None:
            raise ValueError(f"split {self.split!r} is an unbounded stream: pass limit=")
        size = count if limit is None else (limit if count is None else min(count, limit))
        found: dict[str, int] = {}
        for index in range(size):
            found.setdefault(self.fingerprint(self.load_record(index)), index)
        return found

    def hold_out(self, fingerprints: Collection[str]) -> None:
        """Never draw a record with one of these fingerprints at random (``reset`` without an index, and
        :meth:`draw_indices`); an explicit ``options={"index": i}`` still selects record ``i``."""
        self._held_out = frozenset(fingerprints)

    def draw_indices(self, rng: np.random.Generator, size: int | None = None):
        """Random record indices (an int when ``size`` is None), redrawing any that is held out. With
        nothing held out this is exactly one ``rng.integers`` call, so seeded runs draw what they always did."""
        bound = self.num_records or UNBOUNDED_INDEX
        drawn = rng.integers(bound, size=size)
        indices = [int(drawn)] if size is None else [int(i) for i in drawn]
        if self._held_out:
            for position, index in enumerate(indices):
                for _ in range(MAX_HELD_OUT_REDRAWS):
                    if self.fingerprint(self.load_record(index)) not in self._held_out:
                        break
                    index = int(rng.integers(bound))
                else:
                    raise RuntimeError(f"split {self.split!r}: {MAX_HELD_OUT_REDRAWS} draws in a row were held-out "
                                       "records; the training split is (nearly) the held-out set")
                indices[position] = index
        return indices[0] if size is None else indices

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
            index = self.draw_indices(self.np_random)
        self._record = self.record(index)
        self._index = index
        prompt = self.prompt(self._record)
        self._last_text = prompt
        return prompt, {"index": index, "split": self.split, **self.public_info(self._record)}

    def step(self, completion: str) -> tuple[str, float, bool, bool, dict]:
        pending = self.begin_step(completion)
        result = self.reward_fn(pending.completion, pending.record, self.prompt(pending.record))
        return self.finish_step(pending, result)

    def begin_step(self, completion: str) -> PendingStep:
        """End the episode and hand back what to score (for scoring many envs' completions in one batch).

        A completion longer than the action space's ``max_length`` is cut to that length: rewards and
        checkers only ever see bounded text, and ``info["action_truncated"]`` gives the reason.
        """
        if self._record is None:
            raise RuntimeError("call reset() before step(): each episode is one prompt and one completion")
        if not isinstance(completion, str):
            raise TypeError(f"the action must be the completion text (str), got {type(completion).__name__}")
        notes = {}
        limit = self.action_space.max_length
        if len(completion) > limit:
            notes["action_truncated"] = (f"the completion has {len(completion)} characters, more than the action "
                                         f"space's max_length={limit}: only its first {limit} were scored")
            completion = completion[:limit]
        pending = PendingStep(self._record, self._index, completion, notes)
        self._record = None  # the episode ends here
        return pending

    def finish_step(self, pending: PendingStep, result: RewardResult):
        """Report a scored episode: ``(observation, reward, terminated, truncated, info)``."""
        self._last_text = pending.completion
        info = self.step_info(pending.completion, pending.record, pending.index, result)
        info.update(pending.notes)
        return "", float(result.total), True, False, info

    def step_info(self, completion: str, record: Mapping, index: int | None, result: RewardResult) -> dict:
        """The ``info`` of a step: correctness, reward components, and whatever went wrong in scoring."""
        errors = dict(result.errors)
        default = self.default_reward if isinstance(self.default_reward, str) else None
        try:
            if type(self).is_correct is TextTaskEnv.is_correct and default in result.components:
                # already computed: never run the checker (a sandbox, math-verify) twice. A default term that
                # failed (its reason is in reward_errors) did not find the completion correct.
                correct = default not in errors and result.components[default] >= 1.0
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
