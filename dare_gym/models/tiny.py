"""The built-in tiny masked diffusion LM: a bidirectional transformer that reads in one sitting.

It follows LLaDA's conventions (full attention, a dedicated mask token, logits at position i predict
token i) so that every sampler, estimator and algorithm written for LLaDA runs on it unchanged, on CPU,
in minutes. Padding is handled the way batched dLLM inference needs it: a 2D ``attention_mask`` hides
pad keys from every query, and positions come from ``position_ids`` (by default the running count of
real tokens), so a left-padded row computes exactly what it computes alone.

It also takes what a model family builds (``dare_gym.models.families``): an additive 4D mask ``[B, 1, Q, K]``
(block-causal when the config sets ``block_size``: the block-diffusion variant that stands in for SDAR on CPU),
a ``transformers`` ``Cache`` of earlier positions' keys/values, and ``logits_to_keep``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MaskedLMOutput

from dare_gym.models.caching import keep_positions


class TinyDLLMConfig(PreTrainedConfig):
    model_type = "dare_tiny_dllm"

    def __init__(
        self,
        vocab_size: int = 128,
        hidden_size: int = 128,
        num_hidden_layers: int = 3,
        num_attention_heads: int = 4,
        intermediate_size: int = 512,
        max_position_embeddings: int = 256,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        mask_token_id: int = 3,
        pad_token_id: int = 0,
        eos_token_id: int = 2,
        bos_token_id: int = 1,
        block_size: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        self.block_size = block_size  # None: bidirectional; n: block-causal with blocks of n tokens (SDAR-like)
        super().__init__(
            pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=bos_token_id, **kwargs
        )
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size={hidden_size} must be divisible by num_attention_heads={num_attention_heads}"
            )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryEmbedding(nn.Module):
    # The frequencies are recomputed per call rather than kept in a buffer: transformers builds models on
    # the meta device before loading weights, which would leave a non-persistent buffer uninitialised.
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=position_ids.device)
        inv_freq = 1.0 / (self.theta ** (exponents / self.head_dim))
        angles = position_ids[..., None].float() * inv_freq  # [B, T, head_dim/2]
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, T, head_dim]
        return angles.cos().to(dtype), angles.sin().to(dtype)


class Block(GradientCheckpointingLayer):
    """Pre-norm transformer block: bidirectional self-attention, then a SwiGLU MLP."""

    def __init__(self, config: TinyDLLMConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.out = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_bias, cache: Cache | None = None
                ) -> torch.Tensor:
        batch, length, width = h.shape
        q, k, v = self.qkv(self.attn_norm(h)).view(batch, length, 3, self.num_heads, self.head_dim).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:  # keys are stored rotated: their positions are absolute and never change
            k, v = cache.update(k, v, self.layer_idx)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, is_causal=False)
        h = h + self.out(attn.transpose(1, 2).reshape(batch, length, width))
        gate, up = self.gate_up(self.mlp_norm(h)).chunk(2, dim=-1)
        return h + self.down(F.silu(gate) * up)


class TinyDLLMPreTrainedModel(PreTrainedModel):
    config_class = TinyDLLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["Block"]  # FSDP shards block by block

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)


class TinyDLLMModel(TinyDLLMPreTrainedModel):
    """The backbone: token embeddings, rotary positions, bidirectional blocks, final norm."""

    def __init__(self, config: TinyDLLMConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config.hidden_size // config.num_attention_heads, config.rope_theta)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        h = self.embed(input_ids)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is None or attention_mask.dim() == 4:
                position_ids = (torch.arange(input_ids.shape[1], device=input_ids.device) + past).expand_as(input_ids)
            else:
                # Count only real tokens, so left padding does not shift a row's positions.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        cos, sin = self.rotary(position_ids, h.dtype)
        attn_bias = None
        if attention_mask is not None and attention_mask.dim() == 4:
            attn_bias = attention_mask.to(h.dtype)  # built by the model family (block-causal, cached keys, ...)
        elif attention_mask is not None and not bool(attention_mask.all()):
            # Additive bias over keys only: every query (pads included) sees exactly the real tokens.
            keep = attention_mask.bool()[:, None, None, :]
            attn_bias = torch.zeros(keep.shape, dtype=h.dtype, device=h.device)
            attn_bias = attn_bias.masked_fill(~keep, torch.finfo(h.dtype).min)
        for block in self.blocks:
            h = block(h, cos, sin, attn_bias, cache)
        return self.norm(h)


class TinyDLLMForMaskedLM(TinyDLLMPreTrainedModel):
    """Backbone plus an untied LM head; ``logits[:, i]`` predicts token ``i`` (no shift, as in LLaDA)."""

    def __init__(self, config: TinyDLLMConfig):
        super().__init__(config)
        self.model = TinyDLLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        **unused,
    ) -> MaskedLMOutput:
        """``logits_to_keep=n`` computes logits for the last ``n`` positions only (0: all; a 1D tensor of columns:
        those columns); ``cache`` (or
        ``use_cache=True``, which starts one) extends a ``transformers`` ``Cache`` with this call's keys."""
        if use_cache and cache is None:
            cache = DynamicCache()
        hidden = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
        hidden = keep_positions(hidden, logits_to_keep)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            # Plain masked-token cross-entropy (labels = -100 elsewhere); the diffusion ELBO with its
            # 1/t weights lives in dare_gym.core.losses, where the noise level is known.
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _register_with_auto_classes() -> None:
    """Let ``AutoConfig`` / ``AutoModel`` / ``AutoModelForMaskedLM`` load saved tiny models by path."""
    try:
        AutoConfig.register(TinyDLLMConfig.model_type, TinyDLLMConfig)
        AutoModel.register(TinyDLLMConfig, TinyDLLMModel)
        AutoModelForMaskedLM.register(TinyDLLMConfig, TinyDLLMForMaskedLM)
    except ValueError:  # already registered (module re-imported under another name)
        pass


_register_with_auto_classes()

__all__ = ["TinyDLLMConfig", "TinyDLLMModel", "TinyDLLMForMaskedLM", "count_parameters"]
