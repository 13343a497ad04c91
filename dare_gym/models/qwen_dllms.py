"""Dream and SDAR on transformers' native Qwen2 / Qwen3, loading the public checkpoints' own folders.

Both families ship remote modeling code that breaks on transformers 5 (list-form ``_tied_weights_keys``; SDAR
also imports flash-attn at module level; ``reference/MODEL_FAMILIES.md`` §0, 3, 5). Their weights, however,
carry exactly the names of ``Qwen2ForCausalLM`` (Dream: Qwen2.5 with q/k/v biases) and ``Qwen3ForCausalLM``
(SDAR: QK-norm, explicit ``head_dim``). So each family is the native class under the checkpoint's own
``model_type``; what makes it a dLLM lives in its family adapter (:mod:`dare_gym.models.families`): the 4D mask
(bidirectional for Dream, block-causal for SDAR), padding-aware positions, and for Dream the logit shift.

Registering the config classes under ``Dream`` and ``sdar`` lets ``AutoConfig`` / ``AutoModelForCausalLM``
load the folders with ``trust_remote_code=False``: transformers prefers a registered local class to the
``auto_map`` entries.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers import Qwen3Config, Qwen3ForCausalLM


class DreamConfig(Qwen2Config):
    """Dream-v0's ``config.json`` (Qwen2.5 keys plus ``mask_token_id``)."""

    model_type = "Dream"

    def __init__(self, mask_token_id: int | None = None, **kwargs):
        self.mask_token_id = mask_token_id
        kwargs.pop("attn_implementation", None)  # the checkpoint asks for flash-attention-2, which takes no 4D mask
        super().__init__(**kwargs)


class DreamModel(Qwen2ForCausalLM):
    """Qwen2 with an LM head, as Dream's checkpoints name it; bidirectional through its family's mask."""

    config_class = DreamConfig


class SDARConfig(Qwen3Config):
    """SDAR's ``config.json`` (Qwen3 keys plus ``block_size`` and ``mask_token_id``)."""

    model_type = "sdar"

    def __init__(self, block_size: int = 4, mask_token_id: int | None = None, **kwargs):
        self.block_size = block_size
        self.mask_token_id = mask_token_id
        kwargs.pop("attn_implementation", None)  # the checkpoint asks for flex attention, its training path
        super().__init__(**kwargs)


class SDARForCausalLM(Qwen3ForCausalLM):
    """Qwen3 with an LM head, as SDAR's checkpoints name it; block-causal through its family's mask."""

    config_class = SDARConfig


def _register() -> None:
    for config_class, model_class in ((DreamConfig, DreamModel), (SDARConfig, SDARForCausalLM)):
        try:
            AutoConfig.register(config_class.model_type, config_class)
        except ValueError:  # already registered
            continue
        AutoModel.register(config_class, model_class)
        AutoModelForCausalLM.register(config_class, model_class)


_register()

__all__ = ["DreamConfig", "DreamModel", "SDARConfig", "SDARForCausalLM"]
