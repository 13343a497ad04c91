"""The environment registry: dare_gym ids, mirrored into Gymnasium under the ``dare_gym/`` namespace."""

from __future__ import annotations

import difflib
import importlib

import gymnasium

from dare_gym.registries import Registry

NAMESPACE = "dare_gym"
_REGISTERED: Registry = Registry("env")  # short id -> entry point ("module:Class", or the class itself)


# Families of envs registered by importing their module, on first use of one of their ids.
LAZY_FAMILIES = {"rg/": "dare_gym.envs.reasoning_gym"}


def gymnasium_id(env_id: str) -> str:
    """The Gymnasium id of a dare_gym env: ``dare_gym/<env_id>``; a ``/`` inside ``env_id`` (``rg/task-v0``)
    becomes ``.``, since a Gymnasium id holds a single namespace separator (and ``:`` means module:id)."""
    return f"{NAMESPACE}/{env_id.replace('/', '.')}"


def register_env(env_id: str, entry_point=None, **default_kwargs):
    """Register ``env_id`` (e.g. ``"gsm8k-v0"``) so that ``dare_gym.make`` and
    ``gymnasium.make("dare_gym/<env_id>")`` both build it: ``register_env(id, "module:Class")`` (Gymnasium's
    form, which imports the module on first use) or ``@register_env(id)`` on the env class."""
    if entry_point is None:
        def add(cls):
            register_env(env_id, cls, **default_kwargs)
            return cls

        return add
    _REGISTERED.add(env_id, entry_point, overwrite=True)
    gymnasium.register(
        id=gymnasium_id(env_id),
        entry_point=entry_point,
        kwargs=default_kwargs,
        disable_env_checker=True,  # check_env runs in the test suite, not on every make
        order_enforce=False,
    )


def list_envs() -> list[str]:
    """The registered dare_gym env ids, sorted."""
    return sorted(_REGISTERED)


def _short_id(env_id: str) -> str:
    short = env_id.removeprefix(f"{NAMESPACE}/")
    for prefix, module in LAZY_FAMILIES.items():
        if short not in _REGISTERED and short.replace(".", "/", 1).startswith(prefix):
            short = short.replace(".", "/", 1)
            try:
                importlib.import_module(module)
            except ImportError as error:
                raise gymnasium.error.NameNotFound(f"{env_id!r} needs an optional extra: {error}") from None
    if short not in _REGISTERED:
        hint = difflib.get_close_matches(short, list(_REGISTERED), n=1)
        suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
        raise gymnasium.error.NameNotFound(
            f"no dare_gym env {env_id!r}.{suggestion} Registered: {', '.join(list_envs())}"
        )
    return short


def make(env_id: str, **kwargs) -> gymnasium.Env:
    """Build a registered env, e.g. ``make("gsm8k-v0", split="test")``.

    Keyword arguments go to the env's constructor (``split``, ``data_files``, ``reward``, ...). The env is
    returned unwrapped so that its attributes (``num_records``, ``record(i)``) stay reachable.
    """
    short = _short_id(env_id)
    return gymnasium.make(gymnasium_id(short), **kwargs).unwrapped


def make_vec(env_id: str, num_envs: int, group_size: int = 1, **kwargs):
    """A vector of ``num_envs`` envs where each run of ``group_size`` consecutive sub-envs shares one
    problem (a GRPO group). ``num_envs`` must be a multiple of ``group_size``."""
    from dare_gym.vector import GroupedTextVectorEnv

    return GroupedTextVectorEnv([make(env_id, **kwargs) for _ in range(num_envs)], group_size=group_size)
