"""The reward protocol, the reward registry and weighted combinations.

A reward is a plain function ``fn(completion: str, sample: Mapping) -> float``: ``sample`` is the task's
record, gold answer included. Rewards know nothing of models or tensors. A reward that raises, or returns
something that is not a finite number, scores 0 and the reason is reported: a bad reward never stops a
training run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, Union

RewardFn = Callable[[str, Mapping], float]
RewardSpec = Union[str, RewardFn, Sequence[tuple[Union[str, RewardFn], float]], "CombinedReward"]

_REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str, fn: RewardFn | None = None, *, overwrite: bool = False):
    """Register ``fn`` under ``name``; usable as ``register_reward("x", fn)`` or as a decorator."""

    def add(f: RewardFn) -> RewardFn:
        if not callable(f):
            raise TypeError(f"reward {name!r} must be callable, got {type(f).__name__}")
        if name in _REWARDS and not overwrite and _REWARDS[name] is not f:
            raise ValueError(f"a reward named {name!r} is already registered; pass overwrite=True to replace it")
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


def _term_name(fn: RewardFn) -> str:
    return getattr(fn, "reward_name", None) or getattr(fn, "__name__", None) or type(fn).__name__


class CombinedReward:
    """A weighted sum of reward terms, each called safely."""

    def __init__(self, terms: Sequence[tuple[str, RewardFn, float]]):
        if not terms:
            raise ValueError("a reward needs at least one term")
        names = [name for name, _, _ in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"reward term names must be unique, got {names}")
        for name, _, weight in terms:
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"weight of reward term {name!r} must be a finite number, got {weight!r}")
        self.terms = list(terms)

    def __call__(self, completion: str, sample: Mapping) -> RewardResult:
        components: dict[str, float] = {}
        errors: dict[str, str] = {}
        for name, fn, _ in self.terms:
            try:
                value = float(fn(completion, sample))
                if not math.isfinite(value):
                    raise ValueError(f"returned a non-finite score {value!r}")
            except Exception as error:  # noqa: BLE001 - any failure of user code scores 0, with the reason
                value = 0.0
                errors[name] = f"{type(error).__name__}: {error}"
            components[name] = value
        total = sum(weight * components[name] for name, _, weight in self.terms)
        return RewardResult(total=total, components=components, errors=errors)

    def __repr__(self) -> str:
        return "CombinedReward(" + ", ".join(f"{n}×{w:g}" for n, _, w in self.terms) + ")"


def resolve_reward(spec: RewardSpec) -> CombinedReward:
    """Turn a reward name, a callable, or a weighted list ``[("math_verify", 1.0), ("format", 0.1)]`` into
    a :class:`CombinedReward`."""
    if isinstance(spec, CombinedReward):
        return spec
    if isinstance(spec, str):
        return CombinedReward([(spec, get_reward(spec), 1.0)])
    if callable(spec):
        return CombinedReward([(_term_name(spec), spec, 1.0)])
    if isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)):
        terms = []
        for item in spec:
            if not (isinstance(item, Sequence) and len(item) == 2):
                raise ValueError(f"each weighted reward must be a (reward, weight) pair, got {item!r}")
            reward, weight = item
            if isinstance(reward, str):
                terms.append((reward, get_reward(reward), weight))
            elif callable(reward):
                terms.append((_term_name(reward), reward, weight))
            else:
                raise ValueError(f"a reward must be a registered name or a callable, got {reward!r}")
        return CombinedReward(terms)
    raise ValueError(f"reward must be a name, a callable or a list of (reward, weight) pairs, got {spec!r}")
