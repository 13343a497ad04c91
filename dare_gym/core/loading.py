"""Loading a policy from a name or a folder: the family detected from ``config.json``, the model and tokenizer
loaded with this project's own classes, special ids from the checkpoint's files; LoRA adapter folders as base
plus adapter. ``dare_gym.load_policy`` is :func:`load_policy`.

This module sits above :mod:`dare_gym.core.policy` and :mod:`dare_gym.core.lora` (it imports both, neither imports it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dare_gym.core.device import resolve_device, resolve_dtype
from dare_gym.core.lora import ADAPTER_CONFIG_FILE, LoraSettings
from dare_gym.models.families import ModelFamily, family_for_model_type, get_family
from dare_gym.core.policy import BUILTIN_POLICIES, POLICY_META_FILE, DiffusionPolicy


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

    ``"tiny"`` (digit sorting), ``"tiny-long"`` (group sorting, 67-token answers), ``"tiny-block"`` (group
    sorting, block-causal attention with blocks of 4, decoded by the ``block_diffusion`` sampler) and
    ``"tiny-moe"`` (tiny-block's task on the LLaDA2 MoE architecture) are the built-in CPU models trained by
    ``experiments/train_tiny.py``. Anything else is a local folder (or a hub id) of a known family, detected
    from ``config.json``'s ``model_type`` — LLaDA / LLaDA-1.5 (``llada``), Dream (``Dream``), SDAR (``sdar``),
    LLaDA2.x (``llada2_moe``) — and loaded with this project's own classes (no remote code); ``family=``
    overrides the detection. A folder written by :meth:`DiffusionPolicy.save_pretrained`
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
    meta = _read_meta(local)
    if (local / ADAPTER_CONFIG_FILE).is_file():  # an unmerged LoRA adapter: base model + adapter
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


def _read_meta(folder: Path) -> dict:
    """What :meth:`DiffusionPolicy.save_pretrained` recorded in ``folder`` (family, ids, defaults, LoRA), if any."""
    meta_file = folder / POLICY_META_FILE
    return json.loads(meta_file.read_text()) if meta_file.is_file() else {}


def policy_family(name_or_path: str | os.PathLike, family: str | None = None) -> ModelFamily:
    """The family of the policy ``load_policy(name_or_path, family=family)`` would load, from its files alone
    (``config.json``, the saved policy metadata, an adapter's base), without loading a weight."""
    if family is not None:
        return get_family(family)
    local = Path(BUILTIN_POLICIES.get(str(name_or_path), name_or_path))
    meta = _read_meta(local)
    if meta.get("family"):
        return get_family(meta["family"])
    if (local / ADAPTER_CONFIG_FILE).is_file() and meta.get("lora", {}).get("base_model"):
        return policy_family(meta["lora"]["base_model"])
    config = _read_config(local)
    return family_for_model_type(str(config.get("model_type", "")), where=f"{local}/config.json")


def policy_files_summary(name_or_path: str | os.PathLike, family: str | None = None):
    """(block size or None, saved generation defaults, the policy's own sampler) of the policy
    ``load_policy(name_or_path, family=family)`` would load, from its files alone (no weight is loaded)."""
    local = Path(BUILTIN_POLICIES.get(str(name_or_path), name_or_path))
    meta = _read_meta(local)
    if (local / ADAPTER_CONFIG_FILE).is_file():
        raise ValueError("an adapter folder: its base model's files decide")
    chosen, config = resolve_family(local, family or meta.get("family"))
    block_size = chosen.block_size(config)
    defaults = dict(meta.get("generation_defaults", {}))
    own = defaults.get("sampler") or chosen.default_sampler or ("llada" if block_size is None else "block_diffusion")
    return block_size, defaults, own


def policy_config(name_or_path: str | os.PathLike, family: str | None = None):
    """The transformers config of the policy ``load_policy(name_or_path, family=family)`` would load, read from
    its files without a weight (an adapter's: its base's), or None where it cannot be read that way."""
    local = Path(BUILTIN_POLICIES.get(str(name_or_path), name_or_path))
    meta = _read_meta(local)
    if (local / ADAPTER_CONFIG_FILE).is_file() and meta.get("lora", {}).get("base_model"):
        return policy_config(meta["lora"]["base_model"], family)
    try:
        return resolve_family(local, family or meta.get("family"))[1]
    except (OSError, ValueError):
        return None


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


def load_lora_policy(
    path: str | os.PathLike,
    meta: dict | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    family: str | None = None,
    mask_token_id: int | None = None,
    chat_template: bool | None = None,
    trust_remote_code: bool = False,
    **generation_defaults,
) -> DiffusionPolicy:
    """Base model + unmerged adapter folder -> policy (what ``load_policy`` does for an adapter folder).

    The base is the one recorded by :func:`save_lora_policy`, else the adapter's ``base_model_name_or_path``.
    The adapter is loaded trainable, as it was during training.
    """
    from peft import PeftModel

    path = Path(path)
    meta = _read_meta(path) if meta is None else meta
    lora_meta = meta.get("lora") or {}
    adapter_config = json.loads((path / ADAPTER_CONFIG_FILE).read_text())
    base_name = lora_meta.get("base_model") or adapter_config.get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"{path / ADAPTER_CONFIG_FILE} names no base model and {POLICY_META_FILE} records none")
    base = load_policy(base_name, device=device, dtype=dtype, family=family or meta.get("family"),
                       chat_template=chat_template, trust_remote_code=trust_remote_code)
    if getattr(base.family, "tie_adapters", None) is not None:
        # A family whose encoder and decoder share their adapters (DiffusionGemma) saved each shared adapter once,
        # under one of its paths: inject, share, then load, so that every saved key finds its module.
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
        from peft.utils import load_peft_weights

        from dare_gym.core.lora import tie_adapters

        lora_config = LoraConfig.from_pretrained(str(path))
        lora_config.inference_mode = False
        model = get_peft_model(base.model, lora_config)
        tie_adapters(base.family, model)
        set_peft_model_state_dict(model, load_peft_weights(str(path), device=str(base.device)))
        model = model.to(base.device)
    else:
        model = PeftModel.from_pretrained(base.model, str(path), is_trainable=True).to(base.device)
    tokenizer = load_tokenizer(path, base.family, trust_remote_code=trust_remote_code)
    defaults = dict(base.generation_defaults)
    defaults.update(meta.get("generation_defaults", {}))
    defaults.update(generation_defaults)
    if mask_token_id is None:
        mask_token_id = meta.get("mask_token_id", base.mask_token_id)
    policy = DiffusionPolicy(
        model,
        tokenizer,
        mask_token_id=mask_token_id,
        family=base.family,
        stop_token_ids=meta.get("stop_token_ids") or base.stop_token_ids,
        generation_defaults=defaults,
        chat_template=base.chat_template if chat_template is None else chat_template,
    )
    if lora_meta.get("settings"):
        policy.lora_settings = LoraSettings(**lora_meta["settings"])
    policy.lora_base_model = base_name
    return policy
