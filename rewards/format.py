"""Format rewards: whether a completion states its answer in the expected place."""

from __future__ import annotations

import re
from typing import Mapping

from dare_gym.rewards.base import register_reward

_ANSWER_BLOCK = re.compile(r"<answer>\s*(\S.*?)\s*</answer>", re.DOTALL)
_REASONING_THEN_ANSWER = re.compile(
    r"^\s*<reasoning>.*?</reasoning>\s*<answer>\s*\S.*?</answer>\s*$", re.DOTALL
)


@register_reward("format")
def answer_tag_format(completion: str, sample: Mapping) -> float:
    """1.0 if the completion holds exactly one non-empty ``<answer>…</answer>`` block, else 0.0."""
    return 1.0 if len(_ANSWER_BLOCK.findall(completion)) == 1 else 0.0


@register_reward("strict_format")
def reasoning_answer_format(completion: str, sample: Mapping) -> float:
    """1.0 if the completion is exactly ``<reasoning>…</reasoning><answer>…</answer>`` (d1's strict format)."""
    return 1.0 if _REASONING_THEN_ANSWER.match(completion) else 0.0
