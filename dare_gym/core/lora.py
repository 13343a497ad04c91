"""LoRA post-training through ``peft``, for every algorithm.

    settings = LoraSettings(r=8, alpha=16)
    policy = apply_lora(dare_gym.load_policy("tiny"), settings)   # only the adapters are trainable
    reference = adapter_disabled_reference(policy)                # π_ref = the base, no second copy
    save_lora_policy(policy, "out/adapter", merged=False)         # adapter + tokenizer + metadata
    save_lora_policy(policy, "out/merged", merged=True)           # a plain checkpoint, adapters folded in
    dare_gym.load_policy("out/adapter")                           # base + adapter, as trained

The reference policy that KL-regularised algorithms need is the base model itself: the same module run with
its adapters switched off (``PeftModel.disable_adapter``), so LoRA training keeps one copy of the weights.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dare_gym.core.policy import POLICY_META_FILE, TINY_CHECKPOINT, DiffusionPolicy, eval_mode

ADAPTER_CONFIG_FILE = "adapter_config.json"
ALL_LINEAR = "all-linear"
BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (a ``lora:`` config section).

    Attributes:
        r: adapter rank.
        alpha: scaling numerator; the update is ``(alpha / r) · B A``.
        dropout: dropout on the adapter's input, in [0, 1).
        target_modules: module names to adapt. ``None`` (default) = every Linear layer inside the repeated
            transformer blocks (for the tiny model ``qkv``, ``out``, ``gate_up``, ``down``; the LM head and
            embeddings are left alone), or what the model declares as ``lora_default_target_modules`` (LLaDA2:
            attention, dense and shared-expert MLPs, not the routed experts); ``"all-linear"`` = peft's every
            Linear layer but the output layer (routed experts included); or a list of names, each matched
            against the end of a module's dotted path.
        bias: which biases train: ``"none"``, ``"all"`` or ``"lora_only"``.
        merge_on_save: whether the final checkpoint is written merged (a plain model) or as an adapter.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    bias: str = "none"
    merge_on_save: bool = False

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraSettings.r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoraSettings.alpha must be a positive number, got {self.alpha!r}")
        if (
            isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"LoraSettings.dropout must be a number in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            if self.target_modules != ALL_LINEAR:
                raise ValueError(
                    f"LoraSettings.target_modules must be null, {ALL_LINEAR!r} or a list of module names, "
                    f"got the string {self.target_modules!r} (write a single name as [{self.target_modules!r}])"
                )
        elif self.target_modules is not None:
            if not isinstance(self.target_modules, (list, tuple)) or not self.target_modules:
                raise ValueError(
                    f"LoraSettings.target_modules must be null, {ALL_LINEAR!r} or a non-empty list of module "
                    f"names, got {self.target_modules!r}"
                )
            bad = [name for name in self.target_modules if not isinstance(name, str) or not name.strip(". ")]
            if bad:
                raise ValueError(f"LoraSettings.target_modules holds invalid module names: {bad!r}")
            self.target_modules = list(self.target_modules)
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"LoraSettings.bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        if not isinstance(self.merge_on_save, bool):
            raise ValueError(f"LoraSettings.merge_on_save must be true or false, got {self.merge_on_save!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "LoraSettings":
        """Settings from a config mapping; unknown keys raise a ValueError that lists the valid ones."""
        data = dict(data or {})
        valid = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown LoRA setting(s) {unknown}; valid: {sorted(valid)}")
        return cls(**data)


# ------------------------------------------------------------------------------------------- applying
def _is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def block_linear_modules(model: nn.Module) -> list[str]:
    """The Linear layers of the repeated transformer blocks (those under a numbered ``ModuleList`` entry).

    Returns short names (``["qkv", "out", ...]``) when no Linear outside the blocks shares a short name
    (peft matches names against the end of a module's path); otherwise the full dotted paths.
    """
    inside, outside = [], []
    for name in _linear_names(model):
        (inside if any(part.isdigit() for part in name.split(".")) else outside).append(name)
    if not inside:
        raise ValueError(
            f"LoraSettings.target_modules: {type(model).__name__} has no Linear layers inside numbered "
            f"transformer blocks; name the modules to adapt (its Linear layers: {sorted(_linear_names(model))})"
        )
    short = sorted({name.rsplit(".", 1)[-1] for name in inside})
    outside_short = {name.rsplit(".", 1)[-1] for name in outside}
    if outside_short.isdisjoint(short):
        return short
    return inside


def resolve_target_modules(model: nn.Module, settings: LoraSettings, family=None) -> list[str] | str:
    """The ``target_modules`` that peft is given, after checking each named module exists in ``model``. By
    default the family's own (``family.lora_targets``: DiffusionGemma's decoder layers, whose adapters its encoder
    shares), else the transformer blocks' Linear layers."""
    if settings.target_modules is None:
        if getattr(family, "lora_targets", None) is not None:
            return family.lora_targets(model)
        declared = getattr(model, "lora_default_target_modules", None)  # a model's own choice (MoE: no experts)
        return declared if declared is not None else block_linear_modules(model)
    if settings.target_modules == ALL_LINEAR:
        return ALL_LINEAR
    names = [name for name, _ in model.named_modules() if name]
    missing = [
        target for target in settings.target_modules
        if not any(name == target or name.endswith("." + target) for name in names)
    ]
    if missing:
        linear_short = sorted({name.rsplit(".", 1)[-1] for name in _linear_names(model)})
        raise ValueError(
            f"LoraSettings.target_modules: no module named {missing} in {type(model).__name__}; "
            f"its Linear layers are named {linear_short} (or use null for the transformer blocks' Linear "
            f"layers, or {ALL_LINEAR!r})"
        )
    return list(settings.target_modules)


def _base_name_or_path(model: nn.Module) -> str | None:
    """Where the base model came from, as ``load_policy`` accepts it (``"tiny"`` for the built-in one)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not name:
        return None
    try:
        if Path(name).resolve() == TINY_CHECKPOINT.resolve():
            return "tiny"
    except OSError:
        pass
    return str(name)


def tie_adapters(family, model: nn.Module) -> None:
    """Let a family whose layers share weights across module paths share their adapters too (DiffusionGemma's
    encoder and decoder, :meth:`DiffusionGemmaFamily.tie_adapters`); nothing for the others."""
    tie = getattr(family, "tie_adapters", None)
    if tie is not None:
        tie(model)


def trainable_parameters(policy_or_model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    model = getattr(policy_or_model, "model", policy_or_model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def apply_lora(policy: DiffusionPolicy, settings: LoraSettings | None = None, *, verbose: bool = True) -> DiffusionPolicy:
    """Wrap ``policy.model`` in LoRA adapters (``peft.get_peft_model``); only the adapters stay trainable.

    Returns the same policy object with its model replaced by the ``PeftModel``. Build the optimizer after
    this call. The (trainable, total) counts are available from :func:`trainable_parameters`, and are
    printed when ``verbose``.
    """
    from peft import LoraConfig, get_peft_model

    settings = settings if settings is not None else LoraSettings()
    if isinstance(settings, dict):
        settings = LoraSettings.from_dict(settings)
    model = policy.model
    if _is_peft_model(model):
        raise ValueError("apply_lora: the policy's model already carries peft adapters")
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=resolve_target_modules(model, settings, policy.family),
        bias=settings.bias,
        # no task_type: a plain PeftModel forwards input_ids/attention_mask to any custom masked LM
    )
    base_name = _base_name_or_path(model)
    policy.model = get_peft_model(model, config)
    tie_adapters(policy.family, policy.model)
    policy.lora_settings = settings
    policy.lora_base_model = base_name
    if verbose:
        trainable, total = trainable_parameters(policy)
        print(f"LoRA r={settings.r}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return policy


# ------------------------------------------------------------------------------------------ reference
class AdapterDisabledReference(DiffusionPolicy):
    """The base model behind a LoRA policy, as a frozen policy: the SAME module with its adapters off.

    Attribute reads (``model``, ``tokenizer``, ``mask_token_id``, ``family``, ...) go to the wrapped policy,
    so nothing is copied and the view follows the policy. ``logits`` runs under ``torch.no_grad()``,
    ``model.disable_adapter()`` and eval mode (restoring the previous mode), as a frozen copy would.
    """

    def __init__(self, policy: DiffusionPolicy):  # deliberately not DiffusionPolicy.__init__: no copying
        if not _is_peft_model(policy.model):
            raise ValueError("adapter_disabled_reference needs a policy whose model was wrapped by apply_lora")
        object.__setattr__(self, "_policy", policy)

    def __getattr__(self, name: str):
        if name == "_policy":  # not set yet (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self._policy, name)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        model = self.model
        with torch.no_grad(), model.disable_adapter(), eval_mode(model):
            return self._policy.logits(input_ids, attention_mask, **kwargs)

    def save_pretrained(self, path) -> None:
        raise TypeError("the adapter-disabled reference is a view of the base model; save the base or the policy")


def adapter_disabled_reference(policy: DiffusionPolicy) -> AdapterDisabledReference:
    """π_ref for a LoRA policy: its base model (adapters disabled), sharing every weight with the policy."""
    return AdapterDisabledReference(policy)


# ------------------------------------------------------------------------------------- saving/loading
def _write_lora_meta(path: Path, **lora_meta) -> None:
    meta_file = path / POLICY_META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    meta["lora"] = lora_meta
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")


def save_lora_policy(policy: DiffusionPolicy, path: str | os.PathLike, *, merged: bool) -> Path:
    """Save a LoRA policy.

    ``merged=False``: the adapter (``adapter_config.json`` + ``adapter_model.safetensors``), the tokenizer
    and ``dare_gym_policy.json`` recording the base model; ``dare_gym.load_policy(path)`` rebuilds base +
    adapter, and ``peft.PeftModel.from_pretrained(base, path)`` works too.
    ``merged=True``: the adapters folded into a deep copy of the weights (the training model is untouched),
    saved as a plain checkpoint that ``AutoModelForMaskedLM.from_pretrained`` / ``load_policy`` load.
    """
    if not _is_peft_model(policy.model):
        raise ValueError("save_lora_policy needs a policy whose model was wrapped by apply_lora")
    path = Path(path)
    settings = getattr(policy, "lora_settings", None)
    base = getattr(policy, "lora_base_model", None) or _base_name_or_path(policy.model.get_base_model())
    lora_meta: dict[str, Any] = dict(base_model=base, merged=bool(merged))
    if settings is not None:
        lora_meta["settings"] = asdict(settings)
    if merged:
        merged_policy = copy.copy(policy)
        merged_policy.model = copy.deepcopy(policy.model).merge_and_unload()
        tie_adapters(policy.family, merged_policy.model)  # paths that still point at a merged adapter get its base
        merged_policy.save_pretrained(path)
    else:
        policy.save_pretrained(path)  # PeftModel.save_pretrained writes the adapter only
    _write_lora_meta(path, **lora_meta)
    return path


def load_lora_weights(policy: DiffusionPolicy, path: str | os.PathLike) -> None:
    """Load an unmerged adapter's weights into a policy already wrapped by :func:`apply_lora` (for resuming)."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    if not _is_peft_model(policy.model):
        raise ValueError("load_lora_weights needs a policy whose model was wrapped by apply_lora")
    weights = load_peft_weights(str(path), device=str(policy.device))
    result = set_peft_model_state_dict(policy.model, weights)
    if result.unexpected_keys:
        raise ValueError(f"adapter at {path} does not match the policy's adapters: unexpected {result.unexpected_keys[:5]}")
