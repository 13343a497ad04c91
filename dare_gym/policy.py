"""The dLLM policy: a model, its tokenizer and family adapter, and the denoising sampler that acts with it."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from dare_gym.device import resolve_device, resolve_dtype
from dare_gym.distributed import GradientSync
from dare_gym.models.families import ModelFamily, family_for_model_type, get_family
from dare_gym.samplers import get_sampler, make_options

POLICY_META_FILE = "dare_gym_policy.json"
TINY_CHECKPOINT = Path(__file__).parent / "models" / "tiny_checkpoint"
BUILTIN_POLICIES = {
    "tiny": TINY_CHECKPOINT,  # digit sorting (the default task), bidirectional
    "tiny-long": Path(__file__).parent / "models" / "tiny_long_checkpoint",  # group sorting: 67-token answers
    "tiny-block": Path(__file__).parent / "models" / "tiny_block_checkpoint",  # group sorting, block-causal (4)
}
"""Built-in CPU policies, each trained in under two minutes by ``experiments/train_tiny.py``."""


@dataclass
class Completion:
    """One sampled completion and the trace of how it was denoised."""

    text: str
    prompt_ids: torch.Tensor  # [P] the prompt's tokens, no padding
    completion_ids: torch.Tensor  # [gen_length] every generated token, EOS padding included
    unmask_step: torch.Tensor  # [gen_length] the denoising step that committed each token
    commit_logp: torch.Tensor | None = None  # [gen_length] log-prob of each token in the forward that committed it
    step_predictions: torch.Tensor | None = None  # [steps, gen_length] x̂₀ at each step (record_predictions)
    step_confidence: torch.Tensor | None = None  # [steps, gen_length] probability of each guess


class DiffusionPolicy:
    """A masked diffusion LM acting as a policy over text.

    Attributes:
        model: the ``transformers`` model (anything whose output has ``.logits``).
        tokenizer: its tokenizer; prompts are left-padded with its pad token.
        mask_token_id: the id the sampler and estimators write into masked positions.
        family: the :class:`ModelFamily` adapter: it owns the forward (masks, positions, logit shift).
        block_size: the block of block-causal attention (SDAR, a block-causal tiny model); None: bidirectional.
        stop_token_ids: ids that end a completion (EOS, and EOT for chat models).
        chat_template: whether prompts go through the tokenizer's chat template as a user message (instruct
            checkpoints) or are used as plain text (base checkpoints, the tiny model).
        generation_defaults: sampler settings used where ``generate`` is not told otherwise.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        mask_token_id: int | None = None,
        family: str | ModelFamily = "llada",
        stop_token_ids: Sequence[int] | None = None,
        generation_defaults: dict | None = None,
        chat_template: bool = False,
    ):
        self.model = model
        self.forward_module = None  # what forwards call instead of the model (a DDP wrapper in distributed runs)
        self.gradient_sync = GradientSync()  # a no-op switch with one process (see dare_gym.distributed)
        self.tokenizer = tokenizer
        self.family = get_family(family) if isinstance(family, str) else family
        self.block_size = self.family.block_size(model.config) if hasattr(model, "config") else None
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        self.chat_template = bool(chat_template)
        if mask_token_id is None:
            mask_token_id = getattr(model.config, "mask_token_id", None) or tokenizer.mask_token_id
        if mask_token_id is None:
            raise ValueError("no mask token id: pass mask_token_id=, or use a tokenizer that declares one")
        self.mask_token_id = int(mask_token_id)
        if stop_token_ids is None:
            stop_token_ids = [tokenizer.eos_token_id]
        self.stop_token_ids = [int(i) for i in stop_token_ids if i is not None]
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before building a policy")
        self.generation_defaults = dict(
            gen_length=64, steps=64, block_length=32, temperature=0.0, remasking="low_confidence"
        )
        self.generation_defaults.update(generation_defaults or {})

    # ----------------------------------------------------------------------------------------- basics
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, cache=None,
               logits_to_keep: int = 0, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits aligned so that ``logits[:, i]`` predicts token ``i``, whatever the family (its forward builds
        the masks and positions). ``logits_to_keep=n``: only the last n positions; ``cache``, ``position_ids``:
        see :meth:`ModelFamily.forward`."""
        return self.family.forward(self.forward_module or self.model, input_ids, attention_mask,
                                   block_size=self.block_size, cache=cache, logits_to_keep=logits_to_keep,
                                   position_ids=position_ids)

    def format_prompt(self, prompt: str) -> str:
        """The text the model reads for an env's prompt: through the chat template as one user message for
        instruct checkpoints, unchanged otherwise."""
        if not self.chat_template:
            return prompt
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=False)

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise prompts (formatted by :meth:`format_prompt`) into left-padded ids and a 0/1 attention
        mask, on the policy's device."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, got a single str")
        encoded = [self.tokenizer(self.format_prompt(p), add_special_tokens=False)["input_ids"] for p in prompts]
        if any(len(ids) == 0 for ids in encoded):
            raise ValueError("an empty prompt cannot be completed: every row needs at least one prompt token")
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in encoded], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in encoded], dtype=torch.long)
        return ids.to(self.device), mask.to(self.device)

    def completion_mask(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """1 for tokens up to and including the first stop token (the tokens a loss should score)."""
        is_stop = torch.isin(completion_ids, torch.tensor(self.stop_token_ids, device=completion_ids.device))
        stops_before = is_stop.long().cumsum(dim=-1) - is_stop.long()
        return (stops_before == 0).long()

    def decode(self, completion_ids: torch.Tensor) -> str:
        """The completion's text: tokens before the first stop token, special tokens dropped."""
        ids = completion_ids.tolist()
        for i, token in enumerate(ids):
            if token in self.stop_token_ids:
                ids = ids[:i]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        sampler: str | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        batch_size: int = 256,
        record_predictions: bool = False,
        return_stats: bool = False,
        **options,
    ) -> list[Completion]:
        """Complete every prompt with a denoising sampler (:mod:`dare_gym.samplers`).

        ``sampler``: ``llada`` (default for full-attention models), ``fast_dllm``, ``block_diffusion`` (default for
        block-causal models). ``options`` are the sampler's (``gen_length``, ``steps``, ``block_length``,
        ``temperature``, ``remasking``, ``threshold``, ``cache``, ...); unset ones come from
        ``generation_defaults`` where the sampler has them. With ``sampler="llada"``, ``temperature=0`` and
        ``remasking="low_confidence"`` this is LLaDA's reference ``generate()``, token for token. ``seed`` (or
        an explicit ``generator``) makes sampling reproducible. ``record_predictions`` keeps the sampler's guess
        x̂₀ and its confidences at every step (MDPO scores them). ``return_stats=True`` returns
        ``(completions, {"model_calls", "tokens_processed"})``.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, got a single str")
        name, settings = self.sampler_settings(sampler, options)
        chosen = get_sampler(name)
        if generator is None and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        completions: list[Completion] = []
        stats = {"model_calls": 0, "tokens_processed": 0}
        try:
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start : start + batch_size])
                prompt_ids, prompt_mask = self.encode_prompts(chunk)
                out = chosen(self, prompt_ids, prompt_mask, settings, generator=generator,
                             record_predictions=record_predictions)
                stats["model_calls"] += out.model_calls
                stats["tokens_processed"] += out.tokens_processed
                for row in range(len(chunk)):
                    ids = out.completion_ids[row].cpu()
                    completions.append(
                        Completion(
                            text=self.decode(ids),
                            prompt_ids=prompt_ids[row][prompt_mask[row].bool()].cpu(),
                            completion_ids=ids,
                            unmask_step=out.unmask_step[row].cpu(),
                            commit_logp=out.commit_logp[row].cpu(),
                            step_predictions=None if out.step_predictions is None else out.step_predictions[row].cpu(),
                            step_confidence=None if out.step_confidence is None else out.step_confidence[row].cpu(),
                        )
                    )
        finally:
            self.model.train(was_training)
        return (completions, stats) if return_stats else completions

    def sampler_settings(self, sampler: str | None = None, options: dict | None = None):
        """(sampler name, validated options): explicit options over ``generation_defaults``; defaults the chosen
        sampler does not take are left out, explicit ones it does not take are an error naming them."""
        defaults = dict(self.generation_defaults)
        name = sampler or defaults.pop("sampler", None) or self.default_sampler
        defaults.pop("sampler", None)
        fields = {f.name for f in dataclasses.fields(get_sampler(name).options_class)}
        values = {k: v for k, v in defaults.items() if k in fields}
        values.update(options or {})
        return name, make_options(name, values)

    @property
    def default_sampler(self) -> str:
        """``block_diffusion`` for block-causal models, ``llada`` otherwise."""
        return "llada" if self.block_size is None else "block_diffusion"

    # ------------------------------------------------------------------------------------ save/load
    def save_pretrained(self, path: str | os.PathLike, state_dict: dict | None = None) -> None:
        """Save model, tokenizer and this policy's settings; ``state_dict`` overrides the model's own (the whole
        state of a sharded model, gathered)."""
        from transformers.utils import logging as hf_logging

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        hf_logging.disable_progress_bar()  # one bar per checkpoint would drown the training bar
        try:
            self.model.save_pretrained(path, state_dict=state_dict)
        finally:
            hf_logging.enable_progress_bar()
        self.tokenizer.save_pretrained(path)
        meta = dict(
            family=self.family.name, mask_token_id=self.mask_token_id, stop_token_ids=self.stop_token_ids,
            chat_template=self.chat_template, generation_defaults=self.generation_defaults,
        )
        (path / POLICY_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_policy(
    name_or_path: str | os.PathLike = "tiny",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    family: str | None = None,
    mask_token_id: int | None = None,
    chat_template: bool | None = None,
    trust_remote_code: bool = False,
    **generation_defaults,
) -> DiffusionPolicy:
    """Load a dLLM policy by name or path.

    ``"tiny"`` (digit sorting), ``"tiny-long"`` (group sorting, 67-token answers) and ``"tiny-block"`` (group
    sorting, block-causal attention with blocks of 4, decoded by the ``block_diffusion`` sampler) are the
    built-in CPU models trained by ``experiments/train_tiny.py``. Anything else is a local
    folder (or a hub id) of a known family, detected from ``config.json``'s ``model_type`` — LLaDA / LLaDA-1.5
    (``llada``), Dream (``Dream``), SDAR (``sdar``) — and loaded with this project's own classes (no remote
    code); ``family=`` overrides the detection. A folder written by :meth:`DiffusionPolicy.save_pretrained`
    also restores the family, mask id, stop ids and sampler defaults; an unmerged LoRA adapter folder loads
    its base plus the adapter.

    ``device``: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; ``dtype``: ``float32`` | ``bfloat16`` | ``auto``
    (None: as saved). Mask, EOS, EOT and pad ids come from the checkpoint's files (config, generation config,
    tokenizer, chat template). ``chat_template`` (None: use it when the tokenizer has one) formats prompts as a
    user message. Extra keyword arguments override the sampler defaults (``gen_length=...``).
    """
    import dare_gym.models  # noqa: F401  (registers the families' classes with the Auto classes)

    device = resolve_device(device)
    dtype = None if dtype is None else resolve_dtype(dtype, device)
    source = BUILTIN_POLICIES.get(str(name_or_path), name_or_path)
    if str(name_or_path) in BUILTIN_POLICIES and not (Path(source) / "config.json").exists():
        raise FileNotFoundError(
            f"the built-in {name_or_path!r} checkpoint is missing at {source}; rebuild it with "
            f"`python experiments/train_tiny.py --policy {name_or_path}`"
        )
    local = Path(source)
    if not local.exists() and (os.path.isabs(str(source)) or str(source).startswith((".", "~"))):
        raise FileNotFoundError(f"policy folder {str(source)!r} does not exist")
    meta: dict = {}
    meta_file = local / POLICY_META_FILE
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
    if (local / "adapter_config.json").is_file():  # an unmerged LoRA adapter: base model + adapter
        from dare_gym.lora import load_lora_policy

        return load_lora_policy(
            source, meta, device=device, dtype=dtype, family=family, mask_token_id=mask_token_id,
            chat_template=chat_template, trust_remote_code=trust_remote_code, **generation_defaults,
        )
    if local.is_dir() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"{local} has no config.json: not a model folder")
    model_family, config = resolve_family(source, family or meta.get("family"), trust_remote_code)
    model = load_model(source, model_family, dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(source, model_family, trust_remote_code=trust_remote_code)
    if chat_template is None:
        chat_template = meta.get("chat_template", bool(getattr(tokenizer, "chat_template", None)))
    defaults = dict(meta.get("generation_defaults", {}))
    defaults.update(generation_defaults)
    return DiffusionPolicy(
        model.to(device),
        tokenizer,
        mask_token_id=mask_token_id if mask_token_id is not None else meta.get("mask_token_id"),
        family=model_family,
        stop_token_ids=meta.get("stop_token_ids") or stop_token_ids(source, config, tokenizer, chat_template),
        generation_defaults=defaults,
        chat_template=chat_template,
    )


def resolve_family(source, family: str | None, trust_remote_code: bool = False):
    """(family, config) of a checkpoint: ``family`` when given, else the one its ``model_type`` names."""
    from transformers import AutoConfig

    if family is not None:
        chosen = get_family(family)
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        except ValueError:  # a model_type transformers does not know: read it as the chosen family's config
            from transformers import PretrainedConfig

            config = PretrainedConfig.from_pretrained(source)
        return chosen, config
    config_dict = _read_config(source)
    chosen = family_for_model_type(str(config_dict.get("model_type", "")), where=f"{source}/config.json")
    return chosen, AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)


def _read_config(source) -> dict:
    local = Path(source) / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    from transformers import PretrainedConfig

    config_dict, _ = PretrainedConfig.get_config_dict(source)  # a hub id (where the hub is reachable)
    return config_dict


def load_model(source, family: ModelFamily, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """The family's model class from a folder or hub id, with its LM head."""
    import transformers
    from transformers.utils import logging as hf_logging

    auto = getattr(transformers, family.auto_class)
    kwargs = dict(trust_remote_code=trust_remote_code)
    if dtype is not None:
        kwargs["dtype"] = dtype
    hf_logging.disable_progress_bar()
    try:
        return auto.from_pretrained(source, **kwargs)
    finally:
        hf_logging.enable_progress_bar()


def load_tokenizer(source, family: ModelFamily, *, trust_remote_code: bool = False):
    """The checkpoint's tokenizer: ``AutoTokenizer``, or the family's concrete class where the folder names a
    remote tokenizer class (Dream's ``DreamTokenizer`` is a Qwen2 BPE tokenizer)."""
    import transformers

    if family.tokenizer_class is not None and not trust_remote_code:
        tokenizer = getattr(transformers, family.tokenizer_class).from_pretrained(source)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # the families pad with EOS (LLaDA, Dream, SDAR)
    return tokenizer


def stop_token_ids(source, config, tokenizer, chat: bool) -> list[int]:
    """The ids that end a completion, from the checkpoint's files: the tokenizer's EOS, the generation
    config's ``eos_token_id`` (SDAR lists ``<|im_end|>`` there), and with a chat template the token that closes
    an assistant turn (LLaDA's ``<|eot_id|>``, ChatML's ``<|im_end|>``)."""
    from transformers import GenerationConfig

    ids: list[int] = []

    def add(value):
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, int) and item not in ids:
                ids.append(item)

    add(tokenizer.eos_token_id)
    add(getattr(config, "eos_token_id", None))
    try:
        add(GenerationConfig.from_pretrained(source).eos_token_id)
    except (OSError, ValueError):
        pass  # no generation_config.json
    if chat:
        add(end_of_turn_id(tokenizer))
    return ids


def end_of_turn_id(tokenizer) -> int | None:
    """The special token a chat template writes right after an assistant message, if any."""
    marker = "\u2063dare\u2063"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render a conversation: no end-of-turn token
        return None
    after = text.rsplit(marker, 1)[-1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    return ids[0] if ids and ids[0] in tokenizer.all_special_ids + list(tokenizer.added_tokens_decoder) else None
