"""Verifiable rewards: plain functions ``fn(completion, sample) -> float`` and their registry."""

from dare_gym.rewards.base import (
    CombinedReward,
    batched,
    RewardFn,
    RewardResult,
    get_reward,
    list_rewards,
    register_reward,
    resolve_reward,
)
from dare_gym.rewards import code as _code  # noqa: F401  (registers "humaneval", "mbpp")
from dare_gym.rewards import countdown as _countdown  # noqa: F401  (registers "countdown")
from dare_gym.rewards import format as _format  # noqa: F401  (registers "format", "strict_format")
from dare_gym.rewards import math as _math  # noqa: F401  (registers "math_verify")
from dare_gym.rewards import sequence as _sequence  # noqa: F401  (registers "exact_match", "char_match")
from dare_gym.rewards import sudoku as _sudoku  # noqa: F401  (registers "sudoku")
from dare_gym.rewards.math import answers_match, extract_final_answer

__all__ = [
    "CombinedReward",
    "RewardFn",
    "RewardResult",
    "answers_match",
    "batched",
    "extract_final_answer",
    "get_reward",
    "list_rewards",
    "register_reward",
    "resolve_reward",
]
