"""LLaDA2.0 / LLaDA2.1 (inclusionAI; Ling-2.0 / BailingMoeV2 MoE, block diffusion): the architecture, written for
this project from the checkpoint's files and the official modeling code's computation, loading
``inclusionAI/LLaDA2.0-mini``-style folders with no remote code.

The public checkpoints ship remote modeling code that breaks on transformers 5 (list-form ``_tied_weights_keys``;
``reference/MODEL_FAMILIES.md`` §0, §6). This module registers ``model_type: llada2_moe``: ``AutoModel`` builds the
backbone without a head (:class:`LLaDA2MoeModel`, as upstream), ``AutoModelForCausalLM`` /
``AutoModelForMaskedLM`` the model with its head (:class:`LLaDA2MoeModelLM`). Parameter names and config keys are
the checkpoint's: ``model.word_embeddings``, ``model.layers.N.attention.query_key_value``, ``...mlp.experts.E.
gate_proj``, ``...mlp.gate.expert_bias``, ``model.norm``, ``lm_head``.

The network: embedding → N pre-norm decoder layers → RMSNorm → untied head. A layer is
``h = x + dense(attention(n))`` with ``n = input_layernorm(x)``, then ``h + mlp(post_attention_layernorm(h))``.

* **Attention.** One fused ``query_key_value`` projection to ``H + 2·KV`` heads of ``head_dim`` (queries, keys,
  values in that order), an RMSNorm over ``head_dim`` on queries and keys (``query_layernorm``,
  ``key_layernorm``; applied whatever ``use_qk_norm`` says, as upstream does), then rotate-half RoPE over the first
  ``int(head_dim · partial_rotary_factor)`` dimensions of each head only (θ = ``rope_theta``, tables in float32,
  applied in the activations' dtype), grouped-query attention with scale ``head_dim^-0.5``, output ``dense``.
* **MLP.** The first ``first_k_dense_replace`` layers have a dense SwiGLU (``intermediate_size``). The others are
  MoE: a router ``gate`` and ``num_experts`` SwiGLU experts of ``moe_intermediate_size``, plus one SwiGLU of
  ``moe_intermediate_size · num_shared_experts`` (``shared_experts``) that every token passes through.
* **Router** (in float32, ``router_dtype: fp32``; its weight and bias are kept in float32 whatever the model's
  dtype): ``s = sigmoid(x W_gᵀ)``; routing reads ``s + expert_bias``: the experts are split into ``n_group``
  groups, each group scored by the sum of its two best biased scores, the ``topk_group`` best groups kept, and
  the ``num_experts_per_tok`` best biased scores among their experts chosen. The weights are the chosen *unbiased*
  scores, normalised to sum 1 (``norm_topk_prob``; upstream's code normalises whenever k > 1 and the released
  configs all set it) and times ``routed_scaling_factor``. The expert outputs are weighted and summed over the k
  choices in float32 and cast back.
* **Experts** are computed grouped: the (token, choice) slots are sorted by expert, each expert that has tokens
  runs one batched SwiGLU on its slots, and the results go back to slot order before the deterministic weighted
  sum. Under autograd every expert runs (those without tokens on an empty slice), so every expert's parameters
  get a gradient (zero where unused) and data-parallel ranks reduce the same tensors.

**Routing is part of the policy.** The router always runs in float32 (float32 weights, float32 scores), so a
rollout (no grad, eval mode) and the update's forward (grad, train mode) route the same hidden states the same
way; the per-token sum over choices is in a fixed order (no atomics), so nothing differs between the two.
(Forwards of other shapes can differ in the last bits, as any matmul does, and flip a near tie.) ``expert_bias`` is a
buffer: no optimizer sees it (RL leaves it as trained); :meth:`LLaDA2MoeModelLM.update_expert_bias` applies the
auxiliary-loss-free balancing rule where a recipe asks for it.

**Masks.** Block diffusion needs a 4D mask; the family (:mod:`dare_gym.models.families`) always builds the
additive block-causal one. This forward also accepts LLaDA2.0's additive log mask (0 / −inf), LLaDA2.1's 0/1 mask
(1 = may attend; upstream adds it as a bias, which hides nothing, so it is normalised here) and boolean masks.
Where upstream turns a missing or 2D mask into a *causal* one, this forward builds the block-causal mask with
``config.block_size`` (a key the released configs lack: 32, the model card's and DARE's block length), pad keys
hidden, positions counting real tokens. Logits are returned in the head's dtype (upstream casts them to float32;
the project's log-prob code upcasts in chunks, which spares a 157k-wide float32 copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, PreTrainedConfig
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from dare_gym.models.caching import keep_positions

from dare_gym.models.families import attention_inputs
from dare_gym.models.llada import RMSNorm  # the same norm: float32, cast back, then the weight

DEFAULT_BLOCK_SIZE = 32  # LLaDA2.0-mini's model card, its generate() default and DARE's recipes


class LLaDA2MoeConfig(PreTrainedConfig):
    """The checkpoint's configuration keys (``config.json`` of LLaDA2.0-mini / LLaDA2.1-mini; defaults are mini's).

    Keys upstream's forward ignores (``embedding_dropout``, ``output_dropout``, ``sliding_window``,
    ``use_sliding_window``, ``max_window_layers``, ``rotary_dim``, ``norm_softmax``, ...) are kept as they are, so a
    saved config round-trips. ``block_size`` (not in the released configs) is the block of block-causal attention;
    ``mask_token_id`` (not in them either) falls back to the tokenizer's ``<|mask|>``. Values that would need
    another architecture are refused with the key and value named.
    """

    model_type = "llada2_moe"

    def __init__(
        self,
        vocab_size: int = 157184,
        hidden_size: int = 2048,
        intermediate_size: int = 5120,
        num_hidden_layers: int = 20,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 4,
        head_dim: int | None = 128,
        hidden_act: str = "silu",
        use_qkv_bias: bool = False,
        use_bias: bool = False,
        use_qk_norm: bool = True,
        rms_norm_eps: float = 1e-6,
        tie_word_embeddings: bool = False,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 32768,
        rope_theta: float = 600000.0,
        rope_scaling: dict | None = None,
        partial_rotary_factor: float = 0.5,
        num_experts: int | None = 256,
        num_shared_experts: int | None = 1,
        num_experts_per_tok: int = 8,
        n_group: int = 8,
        topk_group: int = 4,
        routed_scaling_factor: float = 2.5,
        norm_topk_prob: bool = True,
        moe_intermediate_size: int = 512,
        first_k_dense_replace: int = 1,
        score_function: str = "sigmoid",
        router_dtype: str = "fp32",
        moe_router_enable_expert_bias: bool = True,
        using_split_qkv_in_self_attention: bool = False,
        block_size: int = DEFAULT_BLOCK_SIZE,
        mask_token_id: int | None = None,
        pad_token_id: int | None = 156892,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.use_qkv_bias = use_qkv_bias
        self.use_bias = use_bias
        self.use_qk_norm = use_qk_norm
        self.rms_norm_eps = rms_norm_eps
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        # Not stored: transformers 5 turns ``rope_scaling`` into its own ``rope_parameters``; only plain RoPE exists
        if rope_scaling is not None and (rope_scaling.get("rope_type", rope_scaling.get("type")) != "default"
                                         if isinstance(rope_scaling, dict) else True):
            raise ValueError(f"LLaDA2 config rope_scaling={rope_scaling!r} is not supported (only null: plain RoPE)")
        self.partial_rotary_factor = partial_rotary_factor
        self.num_experts = num_experts
        self.num_shared_experts = num_shared_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.norm_topk_prob = norm_topk_prob
        self.moe_intermediate_size = moe_intermediate_size
        self.first_k_dense_replace = first_k_dense_replace
        self.score_function = score_function
        self.router_dtype = router_dtype
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.using_split_qkv_in_self_attention = using_split_qkv_in_self_attention
        self.block_size = block_size
        self.mask_token_id = mask_token_id
        super().__init__(pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._validate()

    def _validate(self) -> None:
        supported = {"hidden_act": (self.hidden_act, "silu"), "score_function": (self.score_function, "sigmoid"),
                     "using_split_qkv_in_self_attention": (self.using_split_qkv_in_self_attention, False)}
        for key, (value, only) in supported.items():
            if value != only:
                raise ValueError(f"LLaDA2 config {key}={value!r} is not supported (only {only!r})")
        if str(self.router_dtype).lower() not in ("fp32", "float32"):
            raise ValueError(f"LLaDA2 config router_dtype={self.router_dtype!r} is not supported (only 'fp32': the "
                             "router runs in float32)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.rope_dim % 2 or not 0 < self.rope_dim <= self.head_dim:
            raise ValueError(f"head_dim={self.head_dim} × partial_rotary_factor={self.partial_rotary_factor} gives "
                             f"{self.rope_dim} rotary dimensions: must be even and in (0, head_dim]")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"LLaDA2 config block_size must be a positive integer, got {self.block_size!r}")
        if self.num_experts is None:
            return
        if self.num_experts % self.n_group:
            raise ValueError(f"num_experts={self.num_experts} must be a multiple of n_group={self.n_group}")
        per_group = self.num_experts // self.n_group
        if per_group < 2:  # each group is scored by the sum of its two best experts
            raise ValueError(f"num_experts={self.num_experts} / n_group={self.n_group} leaves {per_group} expert per "
                             "group; the grouped router scores each group by its two best experts (>= 2 needed)")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if not 1 <= self.num_experts_per_tok <= self.topk_group * per_group:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, topk_group × experts per "
                             f"group = {self.topk_group * per_group}]")

    @property
    def rope_dim(self) -> int:
        """Rotary dimensions per head (the first ones; the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, index: int) -> bool:
        return self.num_experts is not None and index >= self.first_k_dense_replace


# ------------------------------------------------------------------------------------------------ pieces


def rotary_tables(position_ids: torch.Tensor, rope_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin ``[B, 1, T, rope_dim]`` of rotate-half RoPE over ``rope_dim`` dimensions, computed in float32 and
    cast to the activations' dtype (where upstream applies them)."""
    exponents = torch.arange(0, rope_dim, 2, dtype=torch.float32, device=position_ids.device) / rope_dim
    angles = position_ids.float()[..., None] * (1.0 / theta**exponents)
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``cos.shape[-1]`` dimensions of each head of ``x`` [B, H, T, D]; the rest unchanged."""
    width = cos.shape[-1]
    rotated, passed = x[..., :width], x[..., width:]
    first, second = rotated.chunk(2, dim=-1)
    rotated = rotated * cos + torch.cat((-second, first), dim=-1) * sin
    return torch.cat((rotated, passed), dim=-1)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4D attention mask in any of LLaDA2's conventions as an additive float mask (0 / most negative).

    * bool: True where a query may attend;
    * float holding only 0 and 1 with at least one 1: LLaDA2.1's convention (1 = may attend). Upstream adds it as
      a bias (+1 on visible keys), which hides nothing: normalised here;
    * any other float: additive already (LLaDA2.0's ``log(0/1)``, i.e. 0 / −inf, or the family's 0 / finfo.min).
    """
    if mask.dtype == torch.bool:
        visible = mask
    elif bool(((mask == 0) | (mask == 1)).all()) and bool((mask == 1).any()):
        visible = mask == 1
    else:
        return mask.to(dtype)
    return torch.zeros(visible.shape, dtype=dtype, device=mask.device).masked_fill(~visible, torch.finfo(dtype).min)


class LLaDA2MoeAttention(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        self.query_key_value = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                                         bias=config.use_qkv_bias)
        self.query_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.key_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.use_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: Cache | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = self.query_key_value(x).view(batch, length, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        q = apply_partial_rotary(self.query_layernorm(q.transpose(1, 2)), cos, sin)
        k = apply_partial_rotary(self.key_layernorm(k.transpose(1, 2)), cos, sin)
        v = v.transpose(1, 2)
        if cache is not None:  # keys are stored rotated: positions are absolute, so they never change
            k, v = cache.update(k, v, self.layer_idx)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False,
                                                  dropout_p=self.dropout if self.training else 0.0,
                                                  enable_gqa=self.num_kv_heads != self.num_heads)
        return self.dense(attended.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))


class LLaDA2MoeMLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))`` (dense layers, experts, shared experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LLaDA2MoeGate(nn.Module):
    """The router: float32 sigmoid scores, expert bias for the choice only, group-limited top-k."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.normalise = config.norm_topk_prob
        self.scale = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        # A buffer, not a parameter: optimizers never see it (see LLaDA2MoeModelLM.update_expert_bias).
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen experts [N, k], their float32 weights [N, k]) for tokens ``x`` [N, hidden]."""
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))
        biased = scores + self.expert_bias.float()
        tokens, experts = biased.shape
        group_scores = biased.view(tokens, self.n_group, experts // self.n_group).topk(2, dim=-1).values.sum(-1)
        groups = group_scores.topk(self.topk_group, dim=-1).indices
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, groups, True)
        allowed = allowed[:, :, None].expand(-1, -1, experts // self.n_group).reshape(tokens, experts)
        chosen = biased.masked_fill(~allowed, float("-inf")).topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, chosen)
        if self.normalise and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return chosen, weights * self.scale


class LLaDA2MoeSparseMoeBlock(nn.Module):
    """Routed experts (grouped: one batched SwiGLU per expert with tokens) plus the shared experts."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.experts = nn.ModuleList(LLaDA2MoeMLP(config.hidden_size, config.moe_intermediate_size)
                                     for _ in range(config.num_experts))
        self.gate = LLaDA2MoeGate(config)
        if config.num_shared_experts is not None:
            self.shared_experts = LLaDA2MoeMLP(config.hidden_size,
                                               config.moe_intermediate_size * config.num_shared_experts)
        self.track_load = False  # count tokens per expert (for update_expert_bias)
        self.register_buffer("expert_load", torch.zeros(config.num_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output [B, T, hidden], chosen experts [B, T, k])."""
        batch, length, width = x.shape
        flat = x.reshape(-1, width)
        chosen, weights = self.gate(flat)
        top_k = chosen.shape[1]
        slots = chosen.reshape(-1)  # slot s is choice s % k of token s // k
        order = slots.argsort(stable=True)
        counts = torch.bincount(slots, minlength=self.num_experts)
        if self.track_load:
            self.expert_load += counts.to(self.expert_load.dtype)
        grouped = flat[order // top_k]
        every_expert = torch.is_grad_enabled()  # empty slices give unused experts a zero gradient
        outputs, start = [], 0
        for expert, count in zip(self.experts, counts.tolist()):
            if count or every_expert:
                outputs.append(expert(grouped[start:start + count]))
            start += count
        stacked = torch.cat(outputs) if outputs else grouped.new_zeros(0, width)
        per_slot = stacked[order.argsort()]  # back to slot order (a gather: autograd keeps the indices only)
        routed = (per_slot.view(-1, top_k, width).float() * weights[..., None]).sum(dim=1).to(x.dtype)
        out = routed.view(batch, length, width)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out, chosen.view(batch, length, top_k)


class LLaDA2MoeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int):
        super().__init__()
        self.attention = LLaDA2MoeAttention(config, layer_idx)
        moe = config.is_moe_layer(layer_idx)
        self.mlp = LLaDA2MoeSparseMoeBlock(config) if moe else LLaDA2MoeMLP(config.hidden_size,
                                                                           config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: Cache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = x + self.attention(self.input_layernorm(x), cos, sin, mask, cache)
        out = self.mlp(self.post_attention_layernorm(h))
        chosen = None
        if isinstance(out, tuple):
            out, chosen = out
        return h + out, chosen


# ------------------------------------------------------------------------------------------------ models


class LLaDA2MoePreTrainedModel(PreTrainedModel):
    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["LLaDA2MoeDecoderLayer"]
    # router_dtype fp32: the router's weight and expert bias stay float32 (patterns searched in parameter names)
    _keep_in_fp32_modules_strict = ["mlp.gate.weight", "mlp.gate.expert_bias"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, LLaDA2MoeGate):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.expert_bias)
        elif isinstance(module, LLaDA2MoeSparseMoeBlock):
            nn.init.zeros_(module.expert_load)


class LLaDA2MoeModel(LLaDA2MoePreTrainedModel):
    """The backbone (``model.*``): embeddings, decoder layers, final norm; what ``AutoModel`` returns, as upstream."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        # padding_idx as upstream: the pad token's row (EOS = pad in LLaDA2) gets no gradient
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LLaDA2MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Cache | None = None, use_cache: bool = False,
                output_router_indices: bool = False, **unused) -> BaseModelOutputWithPast:
        """Hidden states after the final norm. ``attention_mask``: a 4D mask ``[B, 1, Q, K]`` in any convention
        :func:`additive_mask` reads, or None / a 0/1 ``[B, K]`` padding mask (block-causal with
        ``config.block_size``, pad keys hidden). ``position_ids`` default to the running count of real tokens.
        ``output_router_indices``: also return each MoE layer's chosen experts ``[B, T, k]``."""
        batch, length = input_ids.shape
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        x = self.word_embeddings(input_ids)
        if attention_mask is None or attention_mask.dim() == 2:
            padding = attention_mask if attention_mask is not None else \
                torch.ones(batch, past + length, dtype=torch.long, device=input_ids.device)
            mask, default_positions = attention_inputs(padding, length, block_size=self.config.block_size,
                                                       dtype=x.dtype, explicit=True)
        elif attention_mask.dim() == 4:
            if attention_mask.shape[1] != 1 or attention_mask.shape[2] != length or \
                    attention_mask.shape[3] != past + length or attention_mask.shape[0] not in (1, batch):
                raise ValueError(f"LLaDA2 takes 4D attention masks of shape (batch, 1, {length}, {past + length}) "
                                 f"here; got {tuple(attention_mask.shape)}")
            mask = additive_mask(attention_mask, x.dtype)
            default_positions = (torch.arange(length, device=input_ids.device) + past)[None].expand(batch, -1)
        else:
            raise ValueError(f"LLaDA2 takes a 2D padding mask or a 4D attention mask, got a {attention_mask.dim()}D "
                             f"mask of shape {tuple(attention_mask.shape)}")
        if position_ids is None:
            position_ids = default_positions
        cos, sin = rotary_tables(position_ids, self.config.rope_dim, self.config.rope_theta, x.dtype)
        routes = []
        for layer in self.layers:
            x, chosen = layer(x, cos, sin, mask, cache=cache)
            if chosen is not None:
                routes.append(chosen)
        output = BaseModelOutputWithPast(last_hidden_state=self.norm(x), cache=cache)
        if output_router_indices:
            output["router_indices"] = tuple(routes)
        return output


class LLaDA2MoeModelLM(LLaDA2MoePreTrainedModel):
    """LLaDA2 with its LM head; ``logits[:, i]`` predicts token ``i`` (no shift: "same label position")."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        self.model = LLaDA2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def _tied_weights_keys(self):  # transformers 5 wants a mapping {tied: source}
        return {"lm_head.weight": "model.word_embeddings.weight"} if self.config.tie_word_embeddings else {}

    @property
    def lora_default_target_modules(self) -> str:
        """What LoRA adapts by default (``lora.target_modules: null``): attention (``query_key_value``, ``dense``),
        the dense layers' and shared experts' SwiGLU. Routed experts (256 per layer in mini) are opt-in: name them
        (e.g. ``[experts.0.gate_proj]``) or use ``all-linear``. A regex on the full module path (peft's form)."""
        return (r".*\.layers\.\d+\.(attention\.(query_key_value|dense)"
                r"|mlp\.(shared_experts\.)?(gate_proj|up_proj|down_proj))")

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Cache | None = None, use_cache: bool = False,
                logits_to_keep: int | torch.Tensor = 0, output_router_indices: bool = False,
                **unused) -> CausalLMOutputWithPast:
        """Logits ``[B, Q', V]`` (``logits_to_keep=n``: the last n positions only, 0: all; a 1D tensor: those
        columns); see
        :meth:`LLaDA2MoeModel.forward` for masks, positions and the cache. ``router_indices`` on request."""
        output = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                            use_cache=use_cache, output_router_indices=output_router_indices)
        hidden = output.last_hidden_state
        hidden = keep_positions(hidden, logits_to_keep)
        result = CausalLMOutputWithPast(logits=self.lm_head(hidden), cache=output.cache)
        if output_router_indices:
            result["router_indices"] = output["router_indices"]
        return result

    # ------------------------------------------------------------------------------------------ routing
    def moe_blocks(self) -> list[LLaDA2MoeSparseMoeBlock]:
        return [m for m in self.modules() if isinstance(m, LLaDA2MoeSparseMoeBlock)]

    def track_expert_load(self, enabled: bool = True) -> None:
        """Count, from now on, how many tokens each expert of each MoE layer receives (``expert_load``)."""
        for block in self.moe_blocks():
            block.track_load = enabled
            block.expert_load.zero_()

    @torch.no_grad()
    def update_expert_bias(self, rate: float) -> None:
        """Auxiliary-loss-free load balancing (the rule the expert bias is trained with): each layer's
        ``expert_bias`` moves by ``rate`` towards under-used experts (``+rate`` where an expert received fewer
        tokens than the mean since :meth:`track_expert_load`, ``−rate`` where more), then the counts restart.
        Only called where a recipe asks: RL otherwise leaves the bias as the checkpoint has it."""
        if not rate > 0:
            raise ValueError(f"update_expert_bias: rate must be > 0, got {rate!r}")
        for block in self.moe_blocks():
            if not block.track_load:
                raise ValueError("update_expert_bias needs the load counted first: call track_expert_load()")
            load = block.expert_load
            block.gate.expert_bias += rate * torch.sign(load.mean() - load).to(block.gate.expert_bias.dtype)
            load.zero_()


def _register() -> None:
    try:
        AutoConfig.register(LLaDA2MoeConfig.model_type, LLaDA2MoeConfig)
    except ValueError:  # already registered (module imported twice under two names)
        return
    AutoModel.register(LLaDA2MoeConfig, LLaDA2MoeModel)  # as upstream: AutoModel is the backbone, no head
    AutoModelForCausalLM.register(LLaDA2MoeConfig, LLaDA2MoeModelLM)
    AutoModelForMaskedLM.register(LLaDA2MoeConfig, LLaDA2MoeModelLM)


_register()

__all__ = ["LLaDA2MoeConfig", "LLaDA2MoeModel", "LLaDA2MoeModelLM", "additive_mask", "DEFAULT_BLOCK_SIZE"]
