"""One shape for every kind of plug-in: envs, rewards, algorithms, likelihood estimators, samplers and model
families each live in a :class:`Registry`, filled by a ``register_<kind>`` call or decorator beside the thing
it registers, and looked up by name with an error that lists what is registered::

    @register_estimator("d1")                    # dare_gym.core.estimators
    class OneStepMaskedPrompt: ...

    @register_algorithm("d1", DiffuGRPOConfig)   # dare_gym.algorithms
    class DiffuGRPO(PolicyGradient): ...

    @register_reward("exact_match")              # dare_gym.rewards
    def exact_match(completion, sample): ...

    register_env("gsm8k-v0", "dare_gym.envs.gsm8k:GSM8KEnv")   # dare_gym.registry (Gymnasium's registration)
    register_family(ModelFamily("llada", ("llada",)))          # dare_gym.models.families (families are values)

This module depends on nothing, so that rewards (which know nothing of torch) can use it too.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

T = TypeVar("T")


class Registry(dict):
    """Entries of one ``kind`` by name: a dict (``registry[name]``, ``in``, iteration, ``values()``) with
    :meth:`add` that refuses to replace a different entry silently and :meth:`lookup` whose error lists the
    registered names."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def add(self, name: str, entry: T, *, overwrite: bool = False) -> T:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self and self[name] is not entry and not overwrite:
            raise ValueError(f"a {self.kind} named {name!r} is already registered")
        self[name] = entry
        return entry

    def decorator(self, name: str, **options) -> Callable[[T], T]:
        """``@registry.decorator(name)``: register the decorated class or function under ``name``."""
        return lambda entry: self.add(name, entry, **options)

    def lookup(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names()) or 'none'}") from None

    def names(self) -> list[str]:
        return sorted(self)


__all__ = ["Registry"]
