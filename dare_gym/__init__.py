"""dare_gym: post-training diffusion language models with reinforcement learning.

    import dare_gym
    env = dare_gym.make("gsm8k-v0")                 # a gymnasium.Env: prompt in, completion out
    policy = dare_gym.load_policy("tiny")           # a dLLM denoising sampler acting as the policy
    summary = dare_gym.Trainer(dare_gym.TrainConfig(max_steps=20)).train()

The package in layers (docs/ARCHITECTURE.md): ``envs``, ``rewards`` and the env registry at the bottom;
``models`` and ``samplers``; ``core`` (policy, buffer, estimators, shared losses and advantages);
``algorithms``; ``train`` (the loop); ``tools`` (command line, server, comparisons) on top.
"""

from __future__ import annotations

import os as _os

# In a source checkout, envs/, rewards/ and algorithms/ sit beside this package (pyproject maps them to
# dare_gym.envs, dare_gym.rewards, dare_gym.algorithms when installed). Let the same imports work when the
# checkout itself is on sys.path, e.g. `python -c` or pytest run from the repository root.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "envs")) and _os.path.isfile(_os.path.join(_root, "pyproject.toml")):
    __path__.append(_root)  # noqa: F821 - __path__ is defined for packages

from dare_gym import envs as envs  # noqa: E402  (registers the envs)
from dare_gym import rewards as rewards  # noqa: E402
from dare_gym.registry import list_envs, make, make_vec, register_env  # noqa: E402

# These need torch: imported on first use, so that rewards and envs (and the reward helper processes) stay light.
_LAZY = {
    "Completion": "dare_gym.core.policy",
    "DiffusionPolicy": "dare_gym.core.policy",
    "load_policy": "dare_gym.core.loading",
    "RolloutBuffer": "dare_gym.core.buffer",
    "Trainer": "dare_gym.train.trainer",
    "TrainConfig": "dare_gym.train.trainer",
    "GenerationConfig": "dare_gym.train.trainer",
    "evaluate": "dare_gym.train.evaluation",
    "register_algorithm": "dare_gym.algorithms",
    "list_algorithms": "dare_gym.algorithms",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dare_gym' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "Completion",
    "DiffusionPolicy",
    "GenerationConfig",
    "RolloutBuffer",
    "TrainConfig",
    "Trainer",
    "evaluate",
    "list_algorithms",
    "list_envs",
    "load_policy",
    "make",
    "make_vec",
    "register_algorithm",
    "register_env",
]
