"""The algorithm protocol and registry.

An algorithm is one file: a config dataclass (hyper-parameters with the official recipe's defaults) and a
class with three methods the trainer calls on each batch of rollouts:

    buffer = algorithm.advantages(buffer, group_size)           # fill buffer.advantage; may drop rows
    algorithm.prepare(policy, reference, buffer, generator, micro_batch_size)  # score π_old, π_ref
    loss, metrics = algorithm.loss(policy, minibatch, iteration)  # for iteration in range(num_iterations)

Registering is one line: ``@register_algorithm("name", ConfigClass)`` on the class. Nothing else in the
code base dispatches on algorithm names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dare_gym.buffer import RolloutBuffer


@dataclass
class AlgorithmConfig:
    """Fields every algorithm has."""

    num_iterations: int = 1  # μ: updates per batch of rollouts
    beta: float = 0.0  # KL weight towards the frozen reference (0: no reference model is kept)


class Algorithm(Protocol):
    config: AlgorithmConfig

    def __init__(self, config: Any, *, mask_token_id: int): ...

    @property
    def needs_reference(self) -> bool: ...

    def advantages(self, buffer: RolloutBuffer, group_size: int) -> RolloutBuffer: ...

    def prepare(
        self, policy, reference, buffer: RolloutBuffer, generator: torch.Generator | None, micro_batch_size: int
    ) -> None: ...

    def loss(self, policy, batch: RolloutBuffer, iteration: int) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclass(frozen=True)
class AlgorithmEntry:
    name: str
    config_class: type
    algorithm_class: type


ALGORITHMS: dict[str, AlgorithmEntry] = {}


def register_algorithm(name: str, config_class: type):
    """Class decorator: ``@register_algorithm("d1", DiffuGRPOConfig)``."""

    def add(cls: type) -> type:
        if name in ALGORITHMS and ALGORITHMS[name].algorithm_class is not cls:
            raise ValueError(f"an algorithm named {name!r} is already registered")
        ALGORITHMS[name] = AlgorithmEntry(name, config_class, cls)
        cls.name = name
        return cls

    return add


def list_algorithms() -> list[str]:
    return sorted(ALGORITHMS)


def get_algorithm(name: str) -> AlgorithmEntry:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; registered: {', '.join(list_algorithms())}") from None


def build_config(name: str, options: dict[str, Any], *, where: str = "algorithm") -> Any:
    """The algorithm's config dataclass from a dict, with errors that name the bad field and value."""
    from dare_gym.config import dataclass_from_dict

    return dataclass_from_dict(get_algorithm(name).config_class, options, where=where)


def make_algorithm(name: str, config: Any, *, mask_token_id: int) -> Algorithm:
    entry = get_algorithm(name)
    if not isinstance(config, entry.config_class):
        raise TypeError(f"algorithm {name!r} takes a {entry.config_class.__name__}, got {type(config).__name__}")
    return entry.algorithm_class(config, mask_token_id=mask_token_id)


def config_as_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
