"""The algorithm zoo: one module per algorithm, each registered by name."""

from dare_gym.algorithms.base import (
    ALGORITHMS,
    Algorithm,
    AlgorithmConfig,
    build_config,
    get_algorithm,
    list_algorithms,
    make_algorithm,
    register_algorithm,
)
from dare_gym.algorithms import d1 as _d1  # noqa: F401  (registers "d1")

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "AlgorithmConfig",
    "build_config",
    "get_algorithm",
    "list_algorithms",
    "make_algorithm",
    "register_algorithm",
]
