"""DiffusionGemma as a dare_gym family, on transformers' own ``DiffusionGemmaForBlockDiffusion`` (no copy of the
model here: every forward goes through the native class).

What the family adds around the native model (sources: ``transformers/models/diffusion_gemma/modeling_*.py`` and
``generation_diffusion_gemma.py``, read for how ``generate()`` drives the model, and NeMo's DiffusionGemma SFT
recipe for how the model is trained):

* **The split forward.** DiffusionGemma is an encoder–decoder over one shared stack: a causal *encoder* writes the
  prompt (and every finished canvas) into a KV cache, and a bidirectional *decoder* refines a *canvas* of
  ``config.canvas_length`` tokens with cross-attention to that cache, conditioned on the previous step's logits
  (self-conditioning). :meth:`DiffusionGemmaFamily.logits` takes what every other family takes — ids
  ``[prompt ; completion]``, a 0/1 padding mask and ``logits_to_keep = n`` — and turns it into that: the last
  ``n`` positions are the canvases (cut into ``canvas_length`` pieces from the completion's start), everything
  before them is encoder context. Canvas ``j`` sees the prompt and the canvases before it *clean* (``clean_ids``
  where an estimator noised them), which is what block-by-block decoding conditions on and what the recipe
  trains. Self-conditioning logits ride along as ``self_conditioning=`` (None: the zero signal of the first step).
* **Positions and padding.** Positions count real tokens from each row's first one (the context's left padding
  takes none), and canvas positions continue after the row's real context, so a left-padded row computes what it
  computes alone; ``generate()`` counts from column 0, which is the same for unpadded prompts.
* **Uniform noise.** The model is trained to undo uniform random tokens, not [MASK] (``noise="uniform"``):
  algorithms that estimate likelihoods by masking refuse it (:meth:`Algorithm.refusal`); the uniform-noise
  estimators are in :mod:`dare_gym.core.uniform_estimators`, the sampler in :mod:`dare_gym.samplers.diffusion_gemma`.
* **LoRA.** Encoder and decoder layers share their weights (``_tied_weights_keys``). peft wraps modules, not
  parameters, so an adapter put on both paths would give the one shared weight two deltas (and merging would
  add both to it). The family adapts the *decoder's* Linear layers and points the encoder's matching attributes
  at the same adapted modules (:meth:`DiffusionGemmaFamily.tie_adapters`): one delta, seen by both paths, merged
  once.
* **FSDP2.** A shared parameter must live in one ``fully_shard`` unit, so encoder layer i and decoder layer i
  form one unit (:meth:`DiffusionGemmaFamily.fsdp_units`).

The stand-in (:func:`build_standin`) is written through the config classes, so its ``config.json`` and
``generation_config.json`` carry the real keys (``text_config``, ``vision_config``, ``canvas_length``,
``sampler_config``, ``t_min``/``t_max``, ...) at tiny sizes, with a character tokenizer that has Gemma's special
ids (pad 0, eos 1, bos 2) and Gemma's turn markers in its chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dare_gym.models.families import ModelFamily, register_family

# Gemma's special tokens at Gemma's ids (pad 0, eos 1, bos 2, unk 3, mask 4), then the turn and image markers.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>", "<image_soft_token>")
# Gemma's turn format (a user turn, then the model's turn opened for the answer); written for the stand-in.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``DiffusionGemmaForBlockDiffusion`` inside DDP / peft wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        else:
            return model


@dataclass(frozen=True)
class DiffusionGemmaFamily(ModelFamily):
    """The DiffusionGemma family: an encoder over the context, a decoder over canvases (see the module docstring)."""

    # ------------------------------------------------------------------------------------------ sizes
    def canvas_length(self, config) -> int:
        value = getattr(config, "canvas_length", None)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{self.name}: config.canvas_length must be a positive integer, got {value!r}")
        return value

    def new_cache(self, model: torch.nn.Module):
        """An empty encoder cache of the kind ``generate()`` makes (sliding layers keep their window)."""
        from transformers import DynamicCache

        return DynamicCache(config=_base_model(model).config.get_text_config(decoder=True))

    # ---------------------------------------------------------------------------------------- forward
    def canvas_forward(self, model: torch.nn.Module, cache, *, context_ids: torch.Tensor | None,
                       context_mask: torch.Tensor, canvas_ids: torch.Tensor, canvas_mask: torch.Tensor | None = None,
                       self_conditioning: torch.Tensor | None = None,
                       self_conditioning_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, C, V]`` for the canvas ``canvas_ids`` [B, C], one call of the native model.

        ``context_ids`` [B, N]: context tokens not yet in ``cache`` (the prompt at a row's first step, a finished
        canvas at the next canvas's first step); the encoder appends them to ``cache`` in this same call. None:
        the cache already holds the whole context. ``context_mask`` [B, K]: 0/1 over every context position,
        cached and new (left padding 0). ``canvas_mask`` [B, C] (None: all real) hides canvas positions that do
        not exist (a shorter row's right padding). ``self_conditioning`` [B, C, V]: the previous step's
        processed logits (None: the zero signal); ``self_conditioning_mask`` [B] bool zeroes it per row.
        """
        context_mask = context_mask.long()
        if canvas_mask is None:
            canvas_mask = torch.ones_like(canvas_ids)
        real = context_mask.cumsum(dim=-1)
        positions = (real - 1).clamp(min=0)
        kwargs = {}
        if context_ids is not None:
            kwargs.update(input_ids=context_ids, position_ids=positions[:, -context_ids.shape[1]:],
                          attention_mask=context_mask.bool())
        if self_conditioning is not None:
            kwargs["self_conditioning_logits"] = self_conditioning
            if self_conditioning_mask is not None:
                kwargs["self_conditioning_mask"] = self_conditioning_mask.bool()
        # the canvas continues after the row's real context; its own padding (if any) takes no position
        canvas_positions = real[:, -1:] + (canvas_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
        output = model(cache=cache, decoder_input_ids=canvas_ids,
                       decoder_attention_mask=torch.cat([context_mask, canvas_mask.long()], dim=1).bool(),
                       decoder_position_ids=canvas_positions, **kwargs)
        return output.logits

    def logits(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
               block_size: int | None = None, cache=None, logits_to_keep: int = 0,
               position_ids: torch.Tensor | None = None, clean_ids: torch.Tensor | None = None,
               self_conditioning: torch.Tensor | None = None,
               self_conditioning_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, n, V]`` of the last ``n = logits_to_keep`` positions of ``input_ids`` [B, T], read as
        canvases after a context (see the module docstring). Canvas j (``canvas_length`` positions counted from
        the first kept one; the last may be shorter) is decoded with the context before it in the encoder: the
        prompt, then canvases 0..j-1 taken from ``clean_ids`` where given (an estimator's noised input), else from
        ``input_ids``. One native call per canvas; the cache grows by one canvas between calls."""
        if cache is not None or position_ids is not None:
            raise ValueError(f"{self.name}: the split forward builds its own encoder cache and positions; pass "
                             "neither cache nor position_ids (samplers use canvas_forward)")
        width = input_ids.shape[1]
        if not 0 < logits_to_keep < width:
            raise ValueError(f"{self.name}: logits_to_keep must name the canvas positions (0 < n < {width}, the "
                             f"rest being the encoder's context), got {logits_to_keep!r}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        context = clean_ids if clean_ids is not None else input_ids
        start = width - logits_to_keep
        size = self.canvas_length(_base_model(model).config)
        cache_ = self.new_cache(model)
        pieces, encoded = [], 0
        for begin in range(start, width, size):
            end = min(begin + size, width)
            sc = None if self_conditioning is None else self_conditioning[:, begin - start:end - start]
            pieces.append(self.canvas_forward(
                model, cache_, context_ids=context[:, encoded:begin], context_mask=attention_mask[:, :begin],
                canvas_ids=input_ids[:, begin:end], canvas_mask=attention_mask[:, begin:end], self_conditioning=sc,
                self_conditioning_mask=self_conditioning_mask))
            encoded = begin
        return torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]

    def forward(self, model, input_ids, attention_mask, *, block_size=None, cache=None, logits_to_keep=0,
                position_ids=None):
        """The generic forward is the split forward (no clean context, no self-conditioning)."""
        return self.logits(model, input_ids, attention_mask, cache=cache, logits_to_keep=logits_to_keep,
                           position_ids=position_ids)

    def noisy_clean_forward(self, *args, **kwargs):
        raise ValueError(f"{self.name}: canvases already see the clean context through the encoder; call logits("
                         "..., clean_ids=...) instead of the block-diffusion doubled forward")

    # ------------------------------------------------------------------------------------ LoRA, FSDP
    def lora_targets(self, model: torch.nn.Module) -> list[str]:
        """The decoder layers' Linear layers (full paths): the adapters the encoder then shares."""
        return [name for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and ".decoder.layers." in f".{name}"]

    def tie_adapters(self, model: torch.nn.Module) -> None:
        """Make encoder text layer i and decoder layer i use the very same module at every Linear path: after peft
        wrapped the decoder's (the encoder takes the adapter), and after a merge put one path's base layer back
        (both take the base layer). The weights were shared already; now the adapters are too."""
        base = _base_model(model)
        for encoder_layer, decoder_layer in zip(base.model.encoder.language_model.layers, base.model.decoder.layers):
            for name, _ in list(decoder_layer.named_modules(remove_duplicate=False)):
                if "." not in name or ".base_layer" in name or ".lora_" in name:
                    continue
                parent_name, attribute = name.rsplit(".", 1)
                try:
                    encoder_parent = encoder_layer.get_submodule(parent_name)
                except AttributeError:
                    continue
                decoder_parent = decoder_layer.get_submodule(parent_name)
                ours, theirs = getattr(decoder_parent, attribute), getattr(encoder_parent, attribute, None)
                if theirs is None or ours is theirs or not (_is_linear_or_adapter(ours) and _is_linear_or_adapter(theirs)):
                    continue
                shared = _shared_module(ours, theirs)
                setattr(decoder_parent, attribute, shared)
                setattr(encoder_parent, attribute, shared)

    def fsdp_units(self, model: torch.nn.Module) -> list[list[torch.nn.Module]]:
        """Encoder layer i with decoder layer i: they share every weight, and a shared weight must be sharded
        once, in one unit."""
        base = _base_model(model)
        return [[e, d] for e, d in zip(base.model.encoder.language_model.layers, base.model.decoder.layers)]


def _is_adapter(module: torch.nn.Module) -> bool:
    return isinstance(getattr(module, "base_layer", None), torch.nn.Linear)


def _shared_module(first: torch.nn.Module, second: torch.nn.Module) -> torch.nn.Module:
    """Which of two modules over one weight both paths should use: an adapter over the other's plain layer, unless
    that adapter was merged into it (then the plain layer, which holds the merge); else the first."""
    for adapter, plain in ((first, second), (second, first)):
        if _is_adapter(adapter) and not _is_adapter(plain):
            return plain if getattr(adapter, "merged", False) else adapter
    return first


def _is_linear_or_adapter(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return hasattr(module, "base_layer") and isinstance(getattr(module, "base_layer"), torch.nn.Linear)


DIFFUSION_GEMMA = register_family(DiffusionGemmaFamily(
    "diffusion_gemma", ("diffusion_gemma",), auto_class="AutoModelForImageTextToText", noise="uniform",
    default_sampler="diffusion_gemma", scores_columns=False))


# ------------------------------------------------------------------------------------------ stand-in


def build_tokenizer(model_max_length: int = 512):
    """A character tokenizer with Gemma's special ids and turn markers (:data:`SPECIAL_TOKENS` first, then
    every printable ASCII character and the newline), with :data:`CHAT_TEMPLATE`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dare_gym.models.tokenizer import CHARACTERS

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in CHARACTERS:
        vocab.setdefault(char, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        mask_token="<mask>", model_max_length=model_max_length, padding_side="left", clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def standin_config(vocab_size: int, *, hidden_size: int = 64, layers: int = 2, heads: int = 4, experts: int = 4,
                   canvas_length: int = 8, max_positions: int = 512):
    """A ``DiffusionGemmaConfig`` with the real keys at tiny sizes: ``layers`` text layers (sliding attention,
    the last one full, as Gemma lays them out), ``experts`` experts with 2 active, a one-layer vision tower."""
    from transformers import DiffusionGemmaConfig

    head_dim = hidden_size // heads
    layer_types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                head_dim=head_dim, global_head_dim=head_dim, num_global_key_value_heads=max(1, heads // 2),
                layer_types=layer_types, sliding_window=max_positions, max_position_embeddings=max_positions,
                num_experts=experts, top_k_experts=min(2, experts), moe_intermediate_size=hidden_size,
                pad_token_id=0, eos_token_id=1, bos_token_id=2, use_bidirectional_attention="vision")
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=8, position_embedding_size=64, patch_size=4)
    ids = {token: SPECIAL_TOKENS.index(token) for token in ("<start_of_image>", "<end_of_image>", "<image_soft_token>")}
    return DiffusionGemmaConfig(
        text_config=text, vision_config=vision, canvas_length=canvas_length, boi_token_id=ids["<start_of_image>"],
        eoi_token_id=ids["<end_of_image>"], image_token_id=ids["<image_soft_token>"],
        architectures=["DiffusionGemmaForBlockDiffusion"], pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )


def standin_generation_config(*, max_denoising_steps: int = 16):
    """The sampler settings a DiffusionGemma checkpoint ships (``generation_config.json``): transformers'
    defaults (entropy bound 0.1, temperatures 0.8 -> 0.4, stable for 1 step and mean entropy < 0.005) with fewer
    steps, and Gemma's special ids: generation ends at ``<eos>`` or ``<end_of_turn>``, as an instruct checkpoint's
    generation config lists both."""
    from transformers import DiffusionGemmaGenerationConfig
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    return DiffusionGemmaGenerationConfig(
        max_denoising_steps=max_denoising_steps, sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.1),
        t_min=0.4, t_max=0.8, stability_threshold=1, confidence_threshold=0.005,
        eos_token_id=[SPECIAL_TOKENS.index("<eos>"), SPECIAL_TOKENS.index("<end_of_turn>")], pad_token_id=0,
        bos_token_id=2,
    )


def build_standin(folder: str | Path, *, seed: int = 0, hidden_size: int = 64, layers: int = 2, experts: int = 4,
                  canvas_length: int = 8, max_denoising_steps: int = 16, chat_template: bool = True) -> Path:
    """Write a random tiny ``DiffusionGemmaForBlockDiffusion`` checkpoint (config, generation config, weights,
    tokenizer) into ``folder``; ``load_policy(folder)`` loads it as the ``diffusion_gemma`` family."""
    from transformers import DiffusionGemmaForBlockDiffusion

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    if not chat_template:
        tokenizer.chat_template = None
    config = standin_config(len(tokenizer), hidden_size=hidden_size, layers=layers, experts=experts,
                            canvas_length=canvas_length)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config)
    model.generation_config = standin_generation_config(max_denoising_steps=max_denoising_steps)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _register_standin() -> None:
    from dare_gym.models.standin import BUILDERS

    BUILDERS["diffusion_gemma"] = lambda folder, seed=0: build_standin(folder, seed=seed)


_register_standin()


def read_generation_config(model: torch.nn.Module) -> dict:
    """The checkpoint's DiffusionGemma sampler settings (``model.generation_config``), as plain values, with
    transformers' global defaults where a field is unset."""
    from transformers import DiffusionGemmaGenerationConfig

    config = getattr(_base_model(model), "generation_config", None)
    defaults = DiffusionGemmaGenerationConfig._get_default_generation_params()
    values = {}
    for key in ("max_denoising_steps", "t_min", "t_max", "stability_threshold", "confidence_threshold",
                "pad_token_id", "eos_token_id"):
        value = getattr(config, key, None) if config is not None else None
        values[key] = value if value is not None else defaults.get(key)
    sampler = getattr(config, "sampler_config", None) if config is not None else None
    if isinstance(sampler, dict):
        sampler = sampler.get("entropy_bound")
    values["entropy_bound"] = getattr(sampler, "entropy_bound", sampler) or defaults["sampler_config"].entropy_bound
    return values


__all__ = ["DiffusionGemmaFamily", "DIFFUSION_GEMMA", "SPECIAL_TOKENS", "CHAT_TEMPLATE", "build_tokenizer",
           "standin_config", "standin_generation_config", "build_standin", "read_generation_config"]
