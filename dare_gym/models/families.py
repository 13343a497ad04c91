"""Model families: what differs between dLLM families, in one place. **A family owns the forward.**

Given token ids and a 0/1 padding mask (plus, optionally, a KV cache and the number of logits wanted), a
family builds what its model needs and returns logits aligned so that ``logits[:, i]`` predicts token ``i``:

* an additive 4D attention mask ``[B, 1, Q, K]`` (0 where a query may attend, ``finfo.min`` elsewhere):
  bidirectional with pad keys hidden, or **block-causal** for block-diffusion models (bidirectional inside a
  block, causal across blocks; blocks of ``block_size`` real tokens counted from each row's first real token);
* position ids that count only real tokens, so a left-padded row computes exactly what it computes alone;
* the logit shift of families adapted from autoregressive models (Dream: logit i predicts token i+1);
* the cache hook: a ``transformers`` ``Cache`` holding the keys/values of earlier positions (the fast samplers
  of :mod:`dare_gym.samplers` build on it), in which case the padding mask covers cached and new positions.

Samplers, estimators, PPO's value model and MDPO call :meth:`ModelFamily.forward` (through
``DiffusionPolicy.logits``); nothing else calls a model directly. Families are chosen from ``config.json``'s
``model_type`` by :func:`family_for_model_type`; an unknown type is an error that lists the known ones.

| family | model_type | model class | attention | shift |
|---|---|---|---|---|
| ``tiny`` | ``dare_tiny_dllm`` | built-in | full, or block-causal when its config sets ``block_size`` | no |
| ``llada`` | ``llada`` | :mod:`dare_gym.models.llada` (own implementation, checkpoint names) | full | no |
| ``dream`` | ``Dream`` | transformers' Qwen2 (:mod:`dare_gym.models.qwen_dllms`) | full | yes |
| ``sdar`` | ``sdar`` | transformers' Qwen3 (:mod:`dare_gym.models.qwen_dllms`) | block-causal, ``block_size`` | no |
| ``llada2`` | ``llada2_moe`` | :mod:`dare_gym.models.llada2` (own implementation, checkpoint names; MoE) | block-causal, ``block_size`` (32) | no |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dare_gym.registries import Registry


@dataclass(frozen=True)
class ModelFamily:
    """The conventions of one dLLM family.

    Attributes:
        name: the family's name (``family=`` in ``load_policy`` and configs).
        model_types: the ``config.model_type`` values of its checkpoints.
        shift_logits: True for families adapted from AR models (Dream): raw logit i predicts token i+1.
        block_size_key: the config key holding the block size of block-causal attention (``block_size`` for
            SDAR); None for always-bidirectional families. A config without the key (or null) is bidirectional.
        explicit_mask: pass a 4D mask even when nothing is hidden. Native transformers decoders (Qwen2/Qwen3)
            build a *causal* mask when given none, which would silently turn a dLLM autoregressive.
        auto_class: the ``transformers`` Auto class that returns the model with its LM head.
        tokenizer_class: a concrete tokenizer class to use where the folder's tokenizer config names remote
            code (Dream's ``DreamTokenizer`` is a Qwen2 BPE tokenizer); None: ``AutoTokenizer``.
        noise: the corruption the model was trained to undo: ``mask`` (a [MASK] token: every family here so far),
            or ``uniform`` (random tokens); algorithms whose estimators mask tokens refuse the others.
        default_sampler: the sampler a policy of this family uses when none is named (None: ``llada``, or
            ``block_diffusion`` for block-causal models).
        scores_columns: the forward takes a 1D tensor of columns as ``logits_to_keep`` (every family whose model
            is one stack over one sequence); the samplers then run the lm head on the columns they decide only.
    """

    name: str
    model_types: tuple[str, ...]
    shift_logits: bool = False
    block_size_key: str | None = None
    explicit_mask: bool = False
    auto_class: str = "AutoModelForMaskedLM"
    tokenizer_class: str | None = None
    noise: str = "mask"
    default_sampler: str | None = None
    scores_columns: bool = True

    def vocab_size(self, config) -> int:
        """The model's vocabulary size (the ids uniform noise draws from, special tokens included)."""
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        return int(text.vocab_size)

    # ------------------------------------------------------------------------------------ attention
    def block_size(self, config) -> int | None:
        """The block size of block-causal attention for a model with this ``config``; None: bidirectional."""
        if self.block_size_key is None:
            return None
        value = getattr(config, self.block_size_key, None)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{self.name}: config.{self.block_size_key} must be a positive integer, got {value!r}")
        return value

    def attention_inputs(self, attention_mask: torch.Tensor, query_length: int, *, block_size: int | None,
                         dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(additive 4D mask or None, position ids) for the last ``query_length`` positions of rows whose keys
        (cached and new) have the 0/1 padding mask ``attention_mask`` [B, K]."""
        return attention_inputs(attention_mask, query_length, block_size=block_size, dtype=dtype,
                                explicit=self.explicit_mask)

    # -------------------------------------------------------------------------------------- forward
    def forward(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
                block_size: int | None = None, cache=None, logits_to_keep: int | torch.Tensor = 0,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Aligned logits ``[B, Q', V]`` for ``input_ids`` [B, Q].

        ``attention_mask``: 0/1 [B, K] over the cached positions followed by the Q new ones (None: all real).
        ``cache``: a cache of the K − Q earlier positions (a ``transformers`` ``Cache``, which is extended with the
        new keys/values, or a :class:`~dare_gym.models.caching.StaticKVCache`, which writes them in place).
        ``logits_to_keep=n`` returns only the last n positions' logits (0: all Q), which spares the
        vocabulary-wide head elsewhere; a 1D tensor of columns (indices into ``input_ids``' Q positions) returns
        those columns' logits, in that order. ``position_ids`` [B, Q] override the positions counted from the
        mask: a cache whose keys are not in sequence order (Fast-dLLM's dual cache: prefix, suffix, then the
        block) needs the block's true positions.
        """
        batch, query_length = input_ids.shape
        if attention_mask is None:
            past = cache.get_seq_length() if cache is not None else 0
            attention_mask = torch.ones(batch, past + query_length, dtype=torch.long, device=input_ids.device)
        mask, positions = self.attention_inputs(attention_mask, query_length, block_size=block_size,
                                                dtype=_compute_dtype(model))
        if position_ids is not None:
            positions = position_ids
        columns = logits_to_keep if isinstance(logits_to_keep, torch.Tensor) else None
        keep, shifted_columns = logits_to_keep, False
        if columns is not None and self.shift_logits:
            fed = attention_mask[:, -query_length:]
            if columns.numel() == 0 or (int(columns.min()) >= 1 and bool(fed[:, columns - 1].all())):
                keep, shifted_columns = columns - 1, True  # token i reads position i−1, a real token in every row
            else:  # a row's first real token keeps its own logit: align a span from the first column, then pick
                keep = query_length - int(columns.min())
        if isinstance(keep, int) and keep and self.shift_logits:
            keep = min(keep + 1, query_length)  # the first kept token reads the logit before it
        kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=positions)
        if cache is not None:
            kwargs.update(cache=cache, use_cache=True)
        if isinstance(keep, torch.Tensor) or keep:
            kwargs["logits_to_keep"] = keep
        logits = model(**kwargs).logits
        if self.shift_logits and not shifted_columns:
            logits = self.align(logits, attention_mask[:, -logits.shape[1]:])
            if columns is not None:
                logits = logits[:, columns - (query_length - logits.shape[1])]
            elif logits_to_keep:
                logits = logits[:, -logits_to_keep:]
        return logits

    def logits(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
               block_size: int | None = None, cache=None, logits_to_keep: int | torch.Tensor = 0,
               position_ids: torch.Tensor | None = None, clean_ids: torch.Tensor | None = None) -> torch.Tensor:
        """What ``DiffusionPolicy.logits`` computes: with ``clean_ids`` on a block-causal model the doubled
        noisy/clean forward, else :meth:`forward` (full-attention models ignore ``clean_ids``). A family whose
        model is not one stack over one sequence (DiffusionGemma's encoder and decoder) overrides this."""
        if clean_ids is not None and block_size is not None:
            if cache is not None or position_ids is not None:
                raise ValueError("the noisy/clean forward takes no cache or position_ids")
            return self.noisy_clean_forward(model, input_ids, clean_ids, attention_mask, block_size=block_size,
                                            logits_to_keep=logits_to_keep)
        return self.forward(model, input_ids, attention_mask, block_size=block_size, cache=cache,
                            logits_to_keep=logits_to_keep, position_ids=position_ids)

    def noisy_clean_forward(self, model: torch.nn.Module, noisy_ids: torch.Tensor, clean_ids: torch.Tensor,
                            attention_mask: torch.Tensor | None, *, block_size: int,
                            logits_to_keep: int = 0) -> torch.Tensor:
        """Block-diffusion training forward (SDAR / BD3-LM): the noisy copy's aligned logits ``[B, N', V]``.

        One forward over the doubled input of ``noisy_ids`` (x_t) and ``clean_ids`` (x_0), both ``[B, N]`` with
        the same 0/1 padding mask ``attention_mask`` (None: all real). Both copies take the same position ids;
        under :func:`noisy_clean_attention_inputs`' mask, noisy block i sees itself and the clean blocks before
        it, which is exactly what block-by-block decoding sees at block i (the clean blocks are its KV cache).
        So every noisy block is scored, conditioned on the clean earlier blocks, in one forward.

        ``logits_to_keep=n``: only the noisy copy's last n positions (the answer), sparing the LM head the
        rest. For that the clean copy is laid out *first* in the model's input ([x_0 ; x_t]); attention depends
        only on the mask and the positions, so this computes what [x_t ; x_0] computes, in another order.
        """
        if self.shift_logits:
            raise ValueError(f"{self.name}: the noisy/clean forward reads logits at the same position (block "
                             "diffusion has no shift); this family's logits are shifted by one")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if noisy_ids.shape != clean_ids.shape:
            raise ValueError(f"noisy_ids {tuple(noisy_ids.shape)} and clean_ids {tuple(clean_ids.shape)} must have "
                             "the same shape")
        width = noisy_ids.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(noisy_ids)
        elif attention_mask.shape != noisy_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match noisy_ids "
                             f"{tuple(noisy_ids.shape)}: both copies share one padding mask")
        if not 0 <= logits_to_keep <= width:
            raise ValueError(f"logits_to_keep must be in [0, {width}], got {logits_to_keep!r}")
        mask, positions = noisy_clean_attention_inputs(attention_mask, block_size=block_size,
                                                       dtype=_compute_dtype(model))
        output = model(input_ids=torch.cat([clean_ids, noisy_ids], dim=1), attention_mask=mask,
                       position_ids=torch.cat([positions, positions], dim=1), logits_to_keep=logits_to_keep or width)
        return output.logits

    def align(self, outputs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-position outputs (logits or hidden states) [B, T, ·] re-indexed so that position i holds what
        predicts token i. For shifted families that is position i−1's output, where i−1 is a real token; the
        first real token of a row (never predicted) keeps its own, so left padding changes nothing."""
        if not self.shift_logits:
            return outputs
        shifted = torch.cat([outputs[:, :1], outputs[:, :-1]], dim=1)
        previous_real = torch.cat([torch.zeros_like(attention_mask[:, :1]), attention_mask[:, :-1]], dim=1).bool()
        return torch.where(previous_real[..., None], shifted, outputs)


def attention_inputs(attention_mask: torch.Tensor, query_length: int, *, block_size: int | None,
                     dtype: torch.dtype, explicit: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The additive 4D mask ``[B, 1, Q, K]`` and position ids ``[B, Q]`` for the last ``query_length`` of K keys.

    A query attends to every real key (pads hidden), and under block-causal attention only to keys whose
    block (position // block_size) is not after its own. Positions count real tokens from 0 in each row.
    Where nothing is hidden and ``explicit`` is False the mask is None (the model's fast full attention).
    """
    real = attention_mask.bool()
    key_positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    positions = key_positions[:, -query_length:]
    if block_size is None and not explicit and bool(real.all()):
        return None, positions
    visible = real[:, None, :].expand(-1, query_length, -1)  # [B, Q, K]
    if block_size is not None:
        visible = visible & (key_positions[:, None, :] // block_size <= positions[:, :, None] // block_size)
    mask = torch.zeros(visible.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)[:, None], positions


def noisy_clean_attention_inputs(attention_mask: torch.Tensor, *, block_size: int,
                                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The additive mask ``[B, 1, 2N, 2N]`` of the doubled block-diffusion input, and the shared position ids
    ``[B, N]`` of each copy, for rows with the 0/1 padding mask ``attention_mask`` [B, N].

    The input is laid out clean copy first, then noisy (``[x_0 ; x_t]``). With block(k) = position(k) // b,
    positions counting real tokens from each row's first real one (as :func:`attention_inputs` does), and pad
    keys hidden everywhere, a query may attend to:

    * clean query q: clean keys with block(k) <= block(q) (block-causal: what the KV cache holds);
    * noisy query q: clean keys with block(k) < block(q) (the finished blocks before its own) and noisy keys
      with block(k) == block(q) (block-diagonal inside x_t); never a noisy key of another block.
    """
    real = attention_mask.bool()
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    block = positions // block_size
    query_block, key_block = block[:, :, None], block[:, None, :]  # [B, N, 1], [B, 1, N]
    keys = real[:, None, :]
    clean_to_clean = keys & (key_block <= query_block)
    noisy_to_clean = keys & (key_block < query_block)
    noisy_to_noisy = keys & (key_block == query_block)
    visible = torch.cat([torch.cat([clean_to_clean, torch.zeros_like(clean_to_clean)], dim=2),
                         torch.cat([noisy_to_clean, noisy_to_noisy], dim=2)], dim=1)  # [B, 2N, 2N]
    mask = torch.zeros(visible.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)[:, None], positions


def _compute_dtype(model: torch.nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


FAMILIES: Registry = Registry("model family")


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a family (a new dLLM architecture is one registration plus, if transformers lacks it, a model); a
    family is a value, so it is registered by a call rather than a decorator."""
    return FAMILIES.add(family.name, family)


def get_family(name: str) -> ModelFamily:
    return FAMILIES.lookup(name)


def describe_families() -> str:
    return ", ".join(f"{f.name} (model_type {' / '.join(f.model_types)})" for f in FAMILIES.values())


def family_for_model_type(model_type: str, *, where: str = "config.json") -> ModelFamily:
    """The family whose checkpoints declare ``model_type``; an unknown type is an error naming the known ones."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise ValueError(
        f"{where}: model_type {model_type!r} is not a known dLLM family. Known families: {describe_families()}. "
        f"If this checkpoint follows one of them, load it with family=<name> (e.g. load_policy(path, "
        f"family='llada'), or `policy_family: llada` in a train config)."
    )


register_family(ModelFamily("tiny", ("dare_tiny_dllm",), block_size_key="block_size"))
register_family(ModelFamily("llada", ("llada",)))
register_family(ModelFamily("dream", ("Dream", "dream"), shift_logits=True, explicit_mask=True,
                            auto_class="AutoModelForCausalLM", tokenizer_class="Qwen2Tokenizer"))
register_family(ModelFamily("sdar", ("sdar",), block_size_key="block_size", explicit_mask=True,
                            auto_class="AutoModelForCausalLM", tokenizer_class="Qwen2Tokenizer"))
# LLaDA2.x: its config class carries block_size (32 unless the folder's config.json says otherwise).
register_family(ModelFamily("llada2", ("llada2_moe",), block_size_key="block_size", explicit_mask=True,
                            auto_class="AutoModelForCausalLM"))
