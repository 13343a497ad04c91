"""LLaDA (Nie et al., 2025) and LLaDA-1.5: the architecture, written for this project from the paper and the
checkpoint's own files, loading ``GSAI-ML/LLaDA-8B-Instruct``-style folders with no remote code.

The public checkpoints ship remote modeling code that breaks on transformers 5 (no ``post_init``; see
``reference/MODEL_FAMILIES.md`` §0-1). This module registers ``model_type: llada`` with the Auto classes so
that ``AutoModel`` / ``AutoModelForMaskedLM.from_pretrained(folder)`` build :class:`LLaDAModelLM`, whose
parameter names are the checkpoint's (``model.transformer.blocks.N.q_proj.weight``, ...) and whose config
keys are the checkpoint's (``d_model``, ``n_heads``, ``mlp_hidden_size``, ...).

The network (OLMo-style "llama" block): token embedding ``wte`` → N pre-norm blocks → RMSNorm ``ln_f`` →
untied head ``ff_out``. A block is ``h = x + attn_out(attention(RoPE(q), RoPE(k), v))`` on
``attn_norm(x)``, then ``h + ff_out(silu(ff_proj(m)) * up_proj(m))`` on ``ff_norm(h)``; no biases. RMSNorm
and RoPE are computed in float32. Attention is full (bidirectional) unless the caller passes a 4D mask.

Beyond the upstream forward, which takes only a 2D mask, this one accepts what a model family builds
(``dare_gym.models.families``): an additive 4D mask ``[B, 1, Q, K]``, explicit ``position_ids`` (so a
left-padded row computes what it computes alone), a ``transformers`` ``Cache`` for fast rollouts, and
``logits_to_keep`` so that only the positions a loss scores pay for the 126k-wide head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, PreTrainedConfig
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from dare_gym.models.caching import keep_positions


class LLaDAConfig(PreTrainedConfig):
    """The checkpoint's configuration keys (``config.json`` of LLaDA-8B-Base/Instruct, LLaDA-1.5).

    Keys this implementation does not use (``alibi``, ``flash_attention``, ``init_fn``, ...) are kept as they
    are, so a saved config round-trips; values that would need another architecture are refused.
    """

    model_type = "llada"

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = None,
        n_layers: int = 32,
        mlp_hidden_size: int = 12288,
        vocab_size: int = 126464,
        embedding_size: int | None = 126464,
        max_sequence_length: int = 4096,
        rope_theta: float = 500000.0,
        rms_norm_eps: float = 1e-5,
        weight_tying: bool = False,
        include_bias: bool = False,
        include_qkv_bias: bool = False,
        block_type: str = "llama",
        layer_norm_type: str = "rms",
        activation_type: str = "silu",
        rope: bool = True,
        alibi: bool = False,
        mask_token_id: int = 126336,
        pad_token_id: int = 126081,
        eos_token_id: int = 126081,
        init_std: float = 0.02,
        **kwargs,
    ):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.n_layers = n_layers
        self.mlp_hidden_size = mlp_hidden_size
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.max_sequence_length = max_sequence_length
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.weight_tying = weight_tying
        self.include_bias = include_bias
        self.include_qkv_bias = include_qkv_bias
        self.block_type = block_type
        self.layer_norm_type = layer_norm_type
        self.activation_type = activation_type
        self.rope = rope
        self.alibi = alibi
        self.mask_token_id = mask_token_id
        self.init_std = init_std
        kwargs.pop("tie_word_embeddings", None)  # ``weight_tying`` is this family's name for it
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id, tie_word_embeddings=weight_tying,
                         **kwargs)
        unsupported = {
            "block_type": (block_type, "llama"), "layer_norm_type": (layer_norm_type, "rms"),
            "activation_type": (activation_type, "silu"), "rope": (rope, True), "alibi": (alibi, False),
            "include_bias": (include_bias, False),
        }
        for key, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(f"LLaDA config {key}={value!r} is not supported (only {supported!r})")
        if d_model % n_heads or n_heads % self.n_kv_heads:
            raise ValueError(f"d_model={d_model}, n_heads={n_heads}, n_kv_heads={self.n_kv_heads}: d_model must be "
                             "divisible by n_heads and n_heads by n_kv_heads")

    # the names transformers' generic code looks for
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        return self.embedding_size or self.vocab_size


class RMSNorm(nn.Module):
    """RMSNorm in float32, cast back, then scaled by the weight."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x.to(dtype) * self.weight


def rotary(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, 1, T, head_dim] of rotate-half RoPE over the whole head, in float32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim
    angles = position_ids[..., None].float() * (1.0 / theta**exponents)
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class LLaDABlock(GradientCheckpointingLayer):
    def __init__(self, config: LLaDAConfig, layer_idx: int):
        super().__init__()
        width, bias = config.d_model, config.include_qkv_bias
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = width // config.n_heads
        self.attn_norm = RMSNorm(width, config.rms_norm_eps)
        self.q_proj = nn.Linear(width, width, bias=bias)
        self.k_proj = nn.Linear(width, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(width, self.n_kv_heads * self.head_dim, bias=bias)
        self.attn_out = nn.Linear(width, width, bias=False)
        self.ff_norm = RMSNorm(width, config.rms_norm_eps)
        self.ff_proj = nn.Linear(width, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(width, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, width, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention_mask: torch.Tensor | None,
                cache: Cache | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        n = self.attn_norm(x)
        q = self.q_proj(n).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(n).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(n).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:  # keys are stored rotated: positions are absolute, so they never change
            k, v = cache.update(k, v, self.layer_idx)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, is_causal=False,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        h = x + self.attn_out(attended.transpose(1, 2).reshape(batch, length, width))
        m = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m))


class LLaDATransformer(nn.Module):
    """``model.transformer``: the checkpoint's module tree (``wte``, ``blocks``, ``ln_f``, ``ff_out``)."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.wte = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(config, i) for i in range(config.n_layers))
        self.ln_f = RMSNorm(config.d_model, config.rms_norm_eps)
        if not config.weight_tying:
            self.ff_out = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)


class LLaDAModel(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.transformer = LLaDATransformer(config)


class LLaDAPreTrainedModel(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["LLaDABlock"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class LLaDAModelLM(LLaDAPreTrainedModel):
    """LLaDA with its LM head; ``logits[:, i]`` predicts token ``i`` (no shift)."""

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    @property
    def _tied_weights_keys(self):  # transformers 5 wants a mapping {tied: source}
        return {"model.transformer.ff_out.weight": "model.transformer.wte.weight"} if self.config.weight_tying else {}

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Module:
        transformer = self.model.transformer
        return transformer.wte if self.config.weight_tying else transformer.ff_out

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        **unused,
    ) -> CausalLMOutputWithPast:
        """``attention_mask``: None (every key visible), a 0/1 ``[B, K]`` padding mask (turned into an additive
        bias over keys), or an additive float ``[B, 1, Q, K]`` mask built by the family. ``position_ids``
        default to the row's running count of real tokens. ``logits_to_keep=n`` computes logits for the last
        ``n`` positions only (0: all); a 1D tensor of columns, for those columns only."""
        transformer = self.model.transformer
        config = self.config
        x = transformer.wte(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = _default_positions(attention_mask, input_ids.shape[1], past, input_ids.device)
        cos, sin = rotary(position_ids, config.d_model // config.n_heads, config.rope_theta)
        attention_mask = _additive_mask(attention_mask, x.dtype)
        for block in transformer.blocks:
            x = block(x, cos, sin, attention_mask, cache)
        x = transformer.ln_f(x)
        x = keep_positions(x, logits_to_keep)
        # the untied head is called as a module, so hooks on it (PPO's value model reads its input) see the states
        logits = F.linear(x, transformer.wte.weight) if config.weight_tying else transformer.ff_out(x)
        return CausalLMOutputWithPast(logits=logits, cache=cache)


def _default_positions(attention_mask, length: int, past: int, device) -> torch.Tensor:
    if attention_mask is None or attention_mask.dim() != 2:
        return (torch.arange(length, device=device) + past)[None]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]


def _additive_mask(attention_mask, dtype) -> torch.Tensor | None:
    """A 2D 0/1 padding mask as an additive bias over keys; 4D masks pass through; all-ones becomes None."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        return attention_mask.to(dtype) if attention_mask.is_floating_point() else \
            torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
                ~attention_mask.bool(), torch.finfo(dtype).min)
    if bool(attention_mask.all()):
        return None
    keep = attention_mask.bool()[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


def _register() -> None:
    try:
        AutoConfig.register(LLaDAConfig.model_type, LLaDAConfig)
    except ValueError:  # already registered (module imported twice under two names)
        return
    AutoModel.register(LLaDAConfig, LLaDAModelLM)  # as upstream: AutoModel returns the model with its head
    AutoModelForCausalLM.register(LLaDAConfig, LLaDAModelLM)
    AutoModelForMaskedLM.register(LLaDAConfig, LLaDAModelLM)


_register()

__all__ = ["LLaDAConfig", "LLaDAModelLM"]
