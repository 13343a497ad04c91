"""Model family adapters: what differs between dLLM families, in one place, instead of per-algorithm code.

An adapter knows how to turn (ids, padding mask) into logits aligned so that ``logits[:, i]`` predicts token
``i``. Families adapted from autoregressive models (Dream, DiffuCoder) predict token i+1 at position i; the
adapter shifts their logits right by one so that samplers and estimators never need to know.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelFamily:
    name: str
    shift_logits: bool = False  # True for AR-initialised models (Dream): logit i predicts token i+1
    model_types: tuple[str, ...] = ()  # the ``config.model_type`` values this family recognises

    def logits(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        if self.shift_logits:
            # Read token j from logit j-1; position 0 (always a prompt token) reuses logit 0.
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}") from None


def family_for_model_type(model_type: str) -> ModelFamily:
    """The family whose checkpoints declare ``model_type``; unknown types get LLaDA's conventions."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    return FAMILIES["llada"]


register_family(ModelFamily("tiny", model_types=("dare_tiny_dllm",)))
register_family(ModelFamily("llada", model_types=("llada",)))
register_family(ModelFamily("dream", shift_logits=True, model_types=("Dream", "dream")))
