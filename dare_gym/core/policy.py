"""The dLLM policy: a model, its tokenizer and family adapter, and the denoising sampler that acts with it."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from dare_gym.core.distributed import GradientSync
from dare_gym.models.families import ModelFamily, get_family
from dare_gym.samplers import SAMPLERS, get_sampler
from dare_gym.samplers.base import choose_options

POLICY_META_FILE = "dare_gym_policy.json"
MODELS = Path(__file__).resolve().parent.parent / "models"
TINY_CHECKPOINT = MODELS / "tiny_checkpoint"
BUILTIN_POLICIES = {
    "tiny": TINY_CHECKPOINT,  # digit sorting (the default task), bidirectional
    "tiny-long": MODELS / "tiny_long_checkpoint",  # group sorting: 67-token answers
    "tiny-block": MODELS / "tiny_block_checkpoint",  # group sorting, block-causal (4)
    "tiny-gemma": MODELS / "tiny_gemma_checkpoint",  # digit sorting, DiffusionGemma (uniform noise)
    "tiny-moe": MODELS / "tiny_moe_checkpoint",  # tiny-block's task on the LLaDA2 MoE architecture
}
"""Built-in CPU policies, each trained in under two minutes by ``experiments/train_tiny.py`` (``tiny-gemma``, a
native DiffusionGemma: by ``experiments/train_tiny_gemma.py``)."""


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
    trace: dict[str, torch.Tensor] | None = None  # the sampler's replay record for this row (DiffusionGemma's)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """``model`` in eval mode (dropout off: sampling and scoring) inside, back in its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


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
        self.gradient_sync = GradientSync()  # a no-op switch with one process (see dare_gym.core.distributed)
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
    def scores_columns(self) -> bool:
        """``logits`` takes a 1D tensor of columns as ``logits_to_keep`` (see :meth:`ModelFamily.forward`)."""
        return self.family.scores_columns

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, cache=None,
               logits_to_keep: int | torch.Tensor = 0, position_ids: torch.Tensor | None = None,
               clean_ids: torch.Tensor | None = None, **family_inputs) -> torch.Tensor:
        """Logits aligned so that ``logits[:, i]`` predicts token ``i``, whatever the family (its forward builds
        the masks and positions). ``logits_to_keep=n``: only the last n positions (a 1D tensor: those columns);
        ``cache``, ``position_ids``:
        see :meth:`ModelFamily.forward`.

        ``clean_ids``: the clean sequence that ``input_ids`` is a noised copy of (likelihood estimators pass it).
        A block-causal model then scores every noised block given the *clean* blocks before it, in one doubled
        forward (:meth:`ModelFamily.noisy_clean_forward`): what block-by-block decoding conditions on, and how
        block-diffusion models are trained. A plain block-causal forward would condition each block on the
        noised earlier blocks instead. Full-attention models ignore it. ``family_inputs``: what a family's forward
        takes beyond these (DiffusionGemma's ``self_conditioning``); the family owns the dispatch
        (:meth:`ModelFamily.logits`)."""
        return self.family.logits(self.forward_module or self.model, input_ids, attention_mask,
                                  block_size=self.block_size, cache=cache, logits_to_keep=logits_to_keep,
                                  position_ids=position_ids, clean_ids=clean_ids, **family_inputs)

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
        """1 for tokens up to and including the first stop token (EOS or end-of-turn)."""
        return self.response_mask(completion_ids, "through_stop")

    def response_mask(self, completion_ids: torch.Tensor, rule: str) -> torch.Tensor:
        """0/1 [B, L]: the completion positions a loss scores under ``rule`` (an algorithm's ``response_mask``):
        ``all`` every position; ``through_eos`` up to and including the first EOS; ``through_stop`` up to and
        including the first stop token (EOS or end-of-turn); ``before_eos`` the positions before the first EOS."""
        if rule == "all":
            return torch.ones_like(completion_ids, dtype=torch.long)
        ends = self.stop_token_ids if rule == "through_stop" else [self.tokenizer.eos_token_id]
        if rule not in ("through_eos", "through_stop", "before_eos"):
            raise ValueError(f"response mask rule must be all, through_eos, through_stop or before_eos, got {rule!r}")
        is_end = torch.isin(completion_ids, torch.tensor(ends, device=completion_ids.device))
        ends_before = is_end.long().cumsum(dim=-1) - is_end.long()
        keep = ends_before == 0
        if rule == "before_eos":
            keep &= ~is_end
        return keep.long()

    def ended(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """[B] bool: completions that hold a stop token (the others ran to the length limit)."""
        return torch.isin(completion_ids, torch.tensor(self.stop_token_ids, device=completion_ids.device)).any(dim=-1)

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
        prefill: Sequence | None = None,
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
        ``(completions, {"model_calls", "tokens_processed"})``. ``prefill``: one entry per prompt, None or
        ``gen_length`` token ids (the mask id where the sampler generates) that the completion keeps as they are
        and the sampler never remasks (:class:`~dare_gym.samplers.base.Sampler`; IGPO's inpainted hints).
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, got a single str")
        name, settings = self.sampler_settings(sampler, options)
        chosen = get_sampler(name)
        fixed = None if prefill is None else self.prefill_tensor(prefill, len(prompts), settings.gen_length, name)
        if generator is None and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        completions: list[Completion] = []
        stats = {"model_calls": 0, "tokens_processed": 0}
        with eval_mode(self.model):
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start : start + batch_size])
                prompt_ids, prompt_mask = self.encode_prompts(chunk)
                extra = {} if fixed is None else {"prefill": fixed[start:start + batch_size].to(self.device)}
                out = chosen(self, prompt_ids, prompt_mask, settings, generator=generator,
                             record_predictions=record_predictions, **extra)
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
                            trace=None if out.trace is None else {k: v[row].cpu() for k, v in out.trace.items()},
                        )
                    )
        return (completions, stats) if return_stats else completions

    def prefill_tensor(self, prefill: Sequence, rows: int, gen_length: int, sampler: str) -> torch.Tensor:
        """[rows, gen_length] prefilled tokens (the mask id where nothing is fixed) from one entry per prompt."""
        if not get_sampler(sampler).accepts_prefill:
            able = [other for other in SAMPLERS.names() if get_sampler(other).accepts_prefill]
            raise ValueError(f"sampler {sampler!r} cannot keep prefilled completion tokens (prefill=); samplers "
                             f"that can: {', '.join(able)}")
        if len(prefill) != rows:
            raise ValueError(f"prefill has {len(prefill)} entries for {rows} prompts: give one per prompt (None: "
                             "nothing fixed)")
        fixed = torch.full((rows, gen_length), self.mask_token_id, dtype=torch.long)
        for row, tokens in enumerate(prefill):
            if tokens is None:
                continue
            tokens = torch.as_tensor(tokens, dtype=torch.long)
            if tokens.shape != (gen_length,):
                raise ValueError(f"prefill entry {row} has shape {tuple(tokens.shape)}, expected ({gen_length},) "
                                 "(gen_length ids, the mask id where the sampler generates)")
            fixed[row] = tokens
        return fixed

    def sampler_settings(self, sampler: str | None = None, options: dict | None = None):
        """(sampler name, validated options): explicit options over ``generation_defaults``; defaults the chosen
        sampler does not take are left out, explicit ones it does not take are an error naming them."""
        name = self.sampler_name(sampler)
        return name, choose_options(name, self.generation_defaults, options or {}, block_size=self.block_size,
                                    default_sampler=self.sampler_name(None), named=sampler is not None)

    def sampler_name(self, sampler: str | None = None) -> str:
        """The sampler a call uses: ``sampler``, else the policy's generation default, else the family's."""
        return sampler or self.generation_defaults.get("sampler") or self.default_sampler

    @property
    def default_sampler(self) -> str:
        """The family's own sampler where it names one (DiffusionGemma's), ``block_diffusion`` for block-causal
        models, ``llada`` otherwise."""
        if self.family.default_sampler is not None:
            return self.family.default_sampler
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
