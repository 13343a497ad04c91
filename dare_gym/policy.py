"""The dLLM policy: a model, its tokenizer and family adapter, and the denoising sampler that acts with it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from dare_gym.models.families import ModelFamily, family_for_model_type, get_family
from dare_gym.sampling import generate_masked_diffusion

POLICY_META_FILE = "dare_gym_policy.json"
TINY_CHECKPOINT = Path(__file__).parent / "models" / "tiny_checkpoint"


@dataclass
class Completion:
    """One sampled completion and the trace of how it was denoised."""

    text: str
    prompt_ids: torch.Tensor  # [P] the prompt's tokens, no padding
    completion_ids: torch.Tensor  # [gen_length] every generated token, EOS padding included
    unmask_step: torch.Tensor  # [gen_length] the denoising step that committed each token
    step_predictions: torch.Tensor | None = None  # [steps, gen_length] x̂₀ at each step (record_predictions)
    step_confidence: torch.Tensor | None = None  # [steps, gen_length] probability of each guess


class DiffusionPolicy:
    """A masked diffusion LM acting as a policy over text.

    Attributes:
        model: the ``transformers`` model (anything whose output has ``.logits``).
        tokenizer: its tokenizer; prompts are left-padded with its pad token.
        mask_token_id: the id the sampler and estimators write into masked positions.
        family: the :class:`ModelFamily` adapter (logit alignment).
        stop_token_ids: ids that end a completion (EOS, and EOT for chat models).
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
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.family = get_family(family) if isinstance(family, str) else family
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

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits aligned so that ``logits[:, i]`` predicts token ``i``, whatever the family."""
        return self.family.logits(self.model, input_ids, attention_mask)

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise prompts into left-padded ids and a 0/1 attention mask, on the policy's device."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, got a single str")
        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
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
        gen_length: int | None = None,
        steps: int | None = None,
        block_length: int | None = None,
        temperature: float | None = None,
        remasking: str | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        batch_size: int = 256,
        record_predictions: bool = False,
    ) -> list[Completion]:
        """Complete every prompt with the semi-autoregressive masked diffusion sampler.

        Unset settings come from ``generation_defaults``. With ``temperature=0`` and
        ``remasking="low_confidence"`` this is LLaDA's reference ``generate()``, token for token.
        ``seed`` (or an explicit ``generator``) makes sampling reproducible. ``record_predictions`` keeps
        the sampler's guess x̂₀ and its confidences at every step (MDPO scores them).
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, got a single str")
        settings = dict(self.generation_defaults)
        for key, value in dict(
            gen_length=gen_length, steps=steps, block_length=block_length, temperature=temperature,
            remasking=remasking,
        ).items():
            if value is not None:
                settings[key] = value
        if generator is None and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        completions: list[Completion] = []
        try:
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start : start + batch_size])
                prompt_ids, prompt_mask = self.encode_prompts(chunk)
                out = generate_masked_diffusion(
                    self.logits, prompt_ids, prompt_mask, mask_token_id=self.mask_token_id,
                    generator=generator, record_predictions=record_predictions, **settings,
                )
                for row in range(len(chunk)):
                    ids = out.completion_ids[row].cpu()
                    completions.append(
                        Completion(
                            text=self.decode(ids),
                            prompt_ids=prompt_ids[row][prompt_mask[row].bool()].cpu(),
                            completion_ids=ids,
                            unmask_step=out.unmask_step[row].cpu(),
                            step_predictions=None if out.step_predictions is None else out.step_predictions[row].cpu(),
                            step_confidence=None if out.step_confidence is None else out.step_confidence[row].cpu(),
                        )
                    )
        finally:
            self.model.train(was_training)
        return completions

    # ------------------------------------------------------------------------------------ save/load
    def save_pretrained(self, path: str | os.PathLike) -> None:
        from transformers.utils import logging as hf_logging

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        hf_logging.disable_progress_bar()  # one bar per checkpoint would drown the training bar
        try:
            self.model.save_pretrained(path)
        finally:
            hf_logging.enable_progress_bar()
        self.tokenizer.save_pretrained(path)
        meta = dict(
            family=self.family.name, mask_token_id=self.mask_token_id, stop_token_ids=self.stop_token_ids,
            generation_defaults=self.generation_defaults,
        )
        (path / POLICY_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_policy(
    name_or_path: str | os.PathLike = "tiny",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    family: str | None = None,
    mask_token_id: int | None = None,
    trust_remote_code: bool = False,
    **generation_defaults,
) -> DiffusionPolicy:
    """Load a dLLM policy by name or path.

    ``"tiny"`` is the built-in CPU model trained by ``experiments/train_tiny.py``. Anything else is a local
    folder or hub id loaded with ``transformers`` (``AutoModelForMaskedLM``, else ``AutoModel``); a folder
    written by :meth:`DiffusionPolicy.save_pretrained` also restores the family, mask id and sampler
    defaults. Extra keyword arguments override the sampler defaults (``gen_length=...``).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import dare_gym.models.tiny  # noqa: F401  (registers the tiny model with the Auto classes)

    source = TINY_CHECKPOINT if str(name_or_path) == "tiny" else name_or_path
    if str(name_or_path) == "tiny" and not (TINY_CHECKPOINT / "config.json").exists():
        raise FileNotFoundError(
            f"the built-in tiny checkpoint is missing at {TINY_CHECKPOINT}; rebuild it with "
            "`python experiments/train_tiny.py`"
        )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    meta: dict = {}
    meta_file = Path(source) / POLICY_META_FILE
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
    if (Path(source) / "adapter_config.json").is_file():  # an unmerged LoRA adapter: base model + adapter
        from dare_gym.lora import load_lora_policy

        return load_lora_policy(
            source, meta, device=device, dtype=dtype, family=family, mask_token_id=mask_token_id,
            trust_remote_code=trust_remote_code, **generation_defaults,
        )
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    hf_logging.disable_progress_bar()
    try:
        load_kwargs = dict(trust_remote_code=trust_remote_code)
        if dtype is not None:
            load_kwargs["dtype"] = dtype
        try:
            model = AutoModelForMaskedLM.from_pretrained(source, **load_kwargs)
        except ValueError:  # families whose auto_map only names AutoModel (LLaDA, Dream)
            model = AutoModel.from_pretrained(source, **load_kwargs)
    finally:
        hf_logging.enable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    defaults = dict(meta.get("generation_defaults", {}))
    defaults.update(generation_defaults)
    return DiffusionPolicy(
        model.to(device),
        tokenizer,
        mask_token_id=mask_token_id if mask_token_id is not None else meta.get("mask_token_id"),
        family=family or meta.get("family") or family_for_model_type(getattr(config, "model_type", "")),
        stop_token_ids=meta.get("stop_token_ids"),
        generation_defaults=defaults,
    )
