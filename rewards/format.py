"""Format rewards: whether a completion states its answer in the expected place (linear-time checks)."""

from __future__ import annotations

from typing import Mapping

from dare_gym.rewards.base import register_reward
from dare_gym.rewards.extract import count_answer_blocks, is_reasoning_then_answer


@register_reward("format", linear_time=True)
def answer_tag_format(completion: str, sample: Mapping) -> float:
    """1.0 if the completion holds exactly one non-empty ``<answer>…</answer>`` block, else 0.0."""
    return 1.0 if count_answer_blocks(completion, stop_at=2) == 1 else 0.0


@register_reward("strict_format", linear_time=True)
def reasoning_answer_format(completion: str, sample: Mapping) -> float:
    """1.0 if the completion is exactly ``<reasoning>…</reasoning><answer>…</answer>`` (d1's strict format)."""
    return 1.0 if is_reasoning_then_answer(completion) else 0.0
