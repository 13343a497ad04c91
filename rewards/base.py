"""The reward protocol, the reward registry and weighted combinations.

A reward is a plain function ``fn(completion: str, sample: Mapping) -> float``: ``sample`` is the task's
record, gold answer included. TRL-style batched functions ``fn(prompts, completions, **columns) ->
list[float | None]`` plug in too (detected by their first two parameter names, or marked with
:func:`batched`); ``None`` means "does not apply to this sample" and scores 0 without an error. A
per-sample reward may also carry ``fn.batch_fn(completions, samples) -> list[float]``, a faster way to score
many at once (the code rewards run their programs in parallel through it).

Rewards know nothing of models or tensors. A reward that raises, returns something that is not a finite
number, or runs past its time limit scores 0 and the reason is reported: a bad reward never stops a run.
"""

from __future__ import annotations

import inspect
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, Union

RewardFn = Callable[[str, Mapping], float]
RewardSpec = Union[str, RewardFn, Sequence[tuple[Union[str, RewardFn], float]], "CombinedReward"]
DEFAULT_RANGE = (0.0, 1.0)

_REWARDS: dict[str, RewardFn] = {}


def batched(fn: Callable) -> Callable:
    """Mark ``fn(prompts, completions, **columns) -> list[float | None]`` as a batched (TRL-style) reward."""
    fn.batched = True
    return fn


def is_batched(fn: Callable) -> bool:
    if getattr(fn, "batched", False):
        return True
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return names[:2] == ["prompts", "completions"]


def register_reward(name: str, fn: RewardFn | None = None, *, overwrite: bool = False,
                    value_range: tuple[float, float] = DEFAULT_RANGE):
    """Register ``fn`` under ``name``; usable as ``register_reward("x", fn)`` or as a decorator.

    ``value_range`` declares the scores the reward can return (checked by the property tests).
    """

    def add(f: RewardFn) -> RewardFn:
        if not callable(f):
            raise TypeError(f"reward {name!r} must be callable, got {type(f).__name__}")
        if name in _REWARDS and not overwrite and _REWARDS[name] is not f:
            raise ValueError(f"a reward named {name!r} is already registered; pass overwrite=True to replace it")
        f.reward_name = name
        f.value_range = tuple(value_range)
        _REWARDS[name] = f
        return f

    return add if fn is None else add(fn)


def get_reward(name: str) -> RewardFn:
    try:
        return _REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; registered rewards: {', '.join(list_rewards())}") from None


def list_rewards() -> list[str]:
    return sorted(_REWARDS)


@dataclass
class RewardResult:
    """A scored completion: the weighted total, each term's raw score, and any term that failed."""

    total: float
    components: dict[str, float]
    errors: dict[str, str] = field(default_factory=dict)
    not_applicable: list[str] = field(default_factory=list)


def _term_name(fn: Callable) -> str:
    return getattr(fn, "reward_name", None) or getattr(fn, "__name__", None) or type(fn).__name__


class _ScoreError(Exception):
    pass


def _check_score(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        raise _ScoreError(f"returned a non-finite score {value!r}")
    return value


class CombinedReward:
    """A weighted sum of reward terms, each called safely and, if ``timeout_s`` is set, under a time limit.

    The limit is enforced from a helper thread: a term that overruns scores 0 ("timed out"); Python cannot
    kill that thread, so it runs on to its end in the background. Rewards that can hang on adversarial input
    should bound themselves (math-verify and the code sandbox run in killable processes).
    """

    _executor: ThreadPoolExecutor | None = None
    _executor_lock = threading.Lock()

    def __init__(self, terms: Sequence[tuple[str, Callable, float]], *, timeout_s: float | None = None):
        if not terms:
            raise ValueError("a reward needs at least one term")
        names = [name for name, _, _ in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"reward term names must be unique, got {names}")
        for name, _, weight in terms:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"weight of reward term {name!r} must be a finite number, got {weight!r}")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
        self.terms = list(terms)
        self.timeout_s = timeout_s

    @classmethod
    def _pool(cls) -> ThreadPoolExecutor:
        with cls._executor_lock:
            if cls._executor is None:
                cls._executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="reward")
            return cls._executor

    def _call(self, fn: Callable, *args, scale: int = 1):
        if self.timeout_s is None:
            return fn(*args)
        limit = self.timeout_s * scale
        future = self._pool().submit(fn, *args)
        try:
            return future.result(timeout=limit)
        except FutureTimeout:
            raise TimeoutError(f"timed out after {limit:g} s") from None

    def score_many(self, completions: Sequence[str], samples: Sequence[Mapping],
                   prompts: Sequence[str] | None = None) -> list[RewardResult]:
        """Score a batch; batched terms are called once for the whole batch, the others per sample."""
        count = len(completions)
        if len(samples) != count or (prompts is not None and len(prompts) != count):
            raise ValueError(f"{count} completions but {len(samples)} samples / "
                             f"{'no' if prompts is None else len(prompts)} prompts")
        prompts = list(prompts) if prompts is not None else [""] * count
        scores: dict[str, list[float | None]] = {}
        errors: list[dict[str, str]] = [{} for _ in range(count)]
        for name, fn, _ in self.terms:
            if is_batched(fn):
                columns = {key: [s.get(key) for s in samples] for key in set().union(*samples)} if samples else {}
                columns.pop("prompts", None)
                columns.pop("completions", None)
                call = lambda: list(fn(prompts, list(completions), **columns))  # noqa: E731
                scores[name] = self._score_batch(name, call, count, errors, none_allowed=True)
                continue
            batch_fn = getattr(fn, "batch_fn", None)
            if batch_fn is not None and count > 1:
                # A per-sample reward with a parallel batch form (the code sandbox runs programs side by side);
                # the time limit is per completion, so the batch gets count times as long.
                call = lambda: self._call(batch_fn, list(completions), list(samples), scale=count)  # noqa: E731
                scores[name] = self._score_batch(name, call, count, errors, none_allowed=False, timed=False)
                continue
            scores[name] = []
            for i in range(count):
                try:
                    value = _check_score(self._call(fn, completions[i], samples[i]))
                    if value is None:
                        raise _ScoreError("returned None (a per-sample reward must return a number)")
                    scores[name].append(value)
                except Exception as error:  # noqa: BLE001 - a failing reward scores 0, with the reason
                    scores[name].append(0.0)
                    errors[i][name] = f"{type(error).__name__}: {error}"
        results = []
        for i in range(count):
            components = {name: (0.0 if scores[name][i] is None else scores[name][i]) for name, _, _ in self.terms}
            total = sum(weight * components[name] for name, _, weight in self.terms)
            skipped = [name for name, _, _ in self.terms if scores[name][i] is None]
            results.append(RewardResult(total=total, components=components, errors=errors[i], not_applicable=skipped))
        return results

    def _score_batch(self, name: str, call: Callable[[], list], count: int, errors: list[dict[str, str]], *,
                     none_allowed: bool, timed: bool = True) -> list[float | None]:
        """One call scoring the whole batch; each value checked on its own, a failing call scores 0 for all."""
        try:
            values = self._call(call) if timed else call()
            if len(values) != count:
                raise _ScoreError(f"returned {len(values)} scores for {count} completions")
        except Exception as error:  # noqa: BLE001 - a failing reward scores 0, with the reason
            for i in range(count):
                errors[i][name] = f"{type(error).__name__}: {error}"
            return [0.0] * count
        scores: list[float | None] = []
        for i, value in enumerate(values):
            try:
                if value is None and not none_allowed:
                    raise _ScoreError("returned None (a per-sample reward must return a number)")
                scores.append(_check_score(value))
            except (_ScoreError, TypeError, ValueError) as error:
                scores.append(0.0)
                errors[i][name] = f"{type(error).__name__}: {error}"
        return scores

    def __call__(self, completion: str, sample: Mapping, prompt: str = "") -> RewardResult:
        return self.score_many([completion], [sample], [prompt])[0]

    def __repr__(self) -> str:
        return "CombinedReward(" + ", ".join(f"{n}×{w:g}" for n, _, w in self.terms) + ")"


def resolve_reward(spec: RewardSpec, *, timeout_s: float | None = None) -> CombinedReward:
    """Turn a reward name, a callable, or a weighted list ``[("math_verify", 1.0), ("format", 0.1)]`` into
    a :class:`CombinedReward`."""
    if isinstance(spec, CombinedReward):
        return spec
    if isinstance(spec, str):
        return CombinedReward([(spec, get_reward(spec), 1.0)], timeout_s=timeout_s)
    if callable(spec):
        return CombinedReward([(_term_name(spec), spec, 1.0)], timeout_s=timeout_s)
    if isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)):
        terms = []
        for item in spec:
            if not (isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2):
                raise ValueError(f"each weighted reward must be a (reward, weight) pair, got {item!r}")
            reward, weight = item
            if isinstance(reward, str):
                terms.append((reward, get_reward(reward), weight))
            elif callable(reward):
                terms.append((_term_name(reward), reward, weight))
            else:
                raise ValueError(f"a reward must be a registered name or a callable, got {reward!r}")
        return CombinedReward(terms, timeout_s=timeout_s)
    raise ValueError(f"reward must be a name, a callable or a list of (reward, weight) pairs, got {spec!r}")
