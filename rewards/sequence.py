"""Rewards that compare a completion with a gold string position by position."""

from __future__ import annotations

from typing import Mapping

from dare_gym.rewards.base import register_reward


def _gold(sample: Mapping) -> str:
    if "gold" not in sample:
        raise KeyError("the sample has no 'gold' field to compare against")
    return str(sample["gold"])


@register_reward("exact_match", linear_time=True)
def exact_match(completion: str, sample: Mapping) -> float:
    """1.0 if the stripped completion equals the gold string."""
    return 1.0 if completion.strip() == _gold(sample) else 0.0


@register_reward("char_match", linear_time=True)
def char_match(completion: str, sample: Mapping) -> float:
    """Fraction of characters in place: matches / max(len(gold), len(completion)), so missing and extra
    characters both cost. Dense credit for tasks with one right answer (e.g. sorting)."""
    gold, answer = _gold(sample), completion.strip()
    longest = max(len(gold), len(answer))
    if longest == 0:
        return 1.0
    return sum(a == b for a, b in zip(gold, answer)) / longest
