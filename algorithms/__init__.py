"""The algorithm zoo: one module per algorithm, each registering itself with ``@register_algorithm``.

Every module in this folder is imported here, so a new algorithm is one new file and nothing else.
"""

import importlib
import pkgutil

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

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

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
