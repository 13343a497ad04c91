"""Tiny stand-ins of real dLLM checkpoints, in the real format, for machines with no hub and no GPU.

A stand-in folder is what a loader of the real checkpoint sees, shrunk: the real ``config.json`` with its
sizes cut down (every other key kept, ``auto_map`` included), random weights under exactly the names of the
real weight index that the shrunk layer count keeps, and the real tokenizer files where the checkpoint ships
them (Dream, SDAR). LLaDA's and LLaDA2's snapshots have no ``tokenizer.json``: their stand-in tokenizer maps
characters to small ids and every added token of ``tokenizer_config.json`` (mask, EOS, EOT, chat headers) to its
real id (LLaDA2's snapshot records no ids: :data:`SNAPSHOT_SPECIAL_IDS`), with the real chat template, so special
ids and prompt formatting behave as with the real one. A mixture of experts keeps the experts its shrunk config
counts (LLaDA2: 16 of 256).

Without a real folder, :func:`build_standin` writes the project's own small config for the family (the
family's real keys, a character tokenizer), which is what the always-run tests use.

    folder = build_standin("sdar", tmp_path / "sdar", source="../shared/families/SDAR-4B-Chat")
    policy = dare_gym.load_policy(folder)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from dare_gym.models.families import ModelFamily, get_family

TOKENIZER_FILES = ("vocab.json", "merges.txt", "added_tokens.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja")
WEIGHT_INDEX = "model.safetensors.index.json"

# What shrinking keeps small, per family (the names are the checkpoints' own config keys).
SHRINK = {
    "llada": dict(d_model=32, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=64),
    "dream": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_window_layers=2),
    "sdar": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, max_window_layers=2),
    # one dense layer then two MoE layers; 16 experts in 4 groups of 4, the 2 best groups, 4 experts a token
    "llada2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, rotary_dim=4, moe_intermediate_size=16, num_experts=16,
                   n_group=4, topk_group=2, num_experts_per_tok=4, max_window_layers=3),
}

# The project's own small configs: the families' real keys, a character tokenizer (pad 0, bos 1, eos 2, mask 3).
_CHAR_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, mask_token_id=3)
SMALL_CONFIGS = {
    "llada": dict(model_type="llada", architectures=["LLaDAModelLM"], d_model=64, n_heads=4, n_kv_heads=4, n_layers=2,
                  mlp_hidden_size=128, vocab_size=128, embedding_size=128, max_sequence_length=512,
                  rope_theta=500000.0, rms_norm_eps=1e-5, weight_tying=False, block_type="llama",
                  layer_norm_type="rms", activation_type="silu", rope=True, alibi=False, include_bias=False,
                  include_qkv_bias=False, **_CHAR_IDS),
    "dream": dict(model_type="Dream", architectures=["DreamModel"], hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                  max_position_embeddings=512, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  hidden_act="silu", use_sliding_window=False, **_CHAR_IDS),
    "sdar": dict(model_type="sdar", architectures=["SDARForCausalLM"], hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                 max_position_embeddings=512, rope_theta=1000000, rms_norm_eps=1e-6, tie_word_embeddings=False,
                 hidden_act="silu", attention_bias=False, block_size=4, use_sliding_window=False, **_CHAR_IDS),
    "llada2": dict(model_type="llada2_moe", architectures=["LLaDA2MoeModelLM"], hidden_size=64, intermediate_size=128,
                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                   max_position_embeddings=512, rope_theta=600000, partial_rotary_factor=0.5, rms_norm_eps=1e-6,
                   tie_word_embeddings=False, hidden_act="silu", use_qkv_bias=False, use_bias=False, use_qk_norm=True,
                   first_k_dense_replace=1, moe_intermediate_size=32, num_experts=8, num_shared_experts=1,
                   num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                   score_function="sigmoid", router_dtype="fp32", moe_router_enable_expert_bias=True, block_size=4,
                   **_CHAR_IDS),
}

# Special tokens of snapshots that record no ids for them (LLaDA2's has neither tokenizer.json nor
# added_tokens_decoder). Real ids: <|endoftext|> (EOS = pad) is config.json's pad_token_id, <|mask|> the mask id of
# upstream's generate() and reference/MODEL_FAMILIES.md §6. The others are the stand-in's own choice (unverified
# against the real tokenizer): they make the chat template's markers single special tokens, as in a Ling tokenizer.
SNAPSHOT_SPECIAL_IDS = {
    "llada2": {"<|startoftext|>": 156891, "<|endoftext|>": 156892, "[CLS]": 156893, "[gMASK]": 156894,
               "<|mask|>": 156895, "<|role_end|>": 156896, "<role>": 156897, "</role>": 156898},
}


# Families whose stand-in is written through their transformers config classes (name -> builder(folder, seed)):
# DiffusionGemma registers its own (dare_gym.models.diffusion_gemma.build_standin).
BUILDERS: dict = {}


def shrink_config(config: dict, family: str, sizes: dict | None = None) -> dict:
    """The real config with its sizes replaced by :data:`SHRINK`'s, then by ``sizes`` (the config's own keys,
    e.g. ``{"d_model": 512, "n_layers": 24}`` for a compute-bound LLaDA benchmark); every other key is kept."""
    if family not in SHRINK:
        raise ValueError(f"no shrink rule for family {family!r}; known: {', '.join(SHRINK)}")
    unknown = sorted(set(sizes or {}) - set(config))
    if unknown:
        raise ValueError(f"sizes {unknown} are not keys of the {family} config; its keys: {', '.join(sorted(config))}")
    shrunk = dict(config)
    shrunk.update(SHRINK[family])
    shrunk.update(sizes or {})
    return shrunk


def kept_weight_names(index: dict, num_layers: int, num_experts: int | None = None) -> set[str]:
    """The names of a weight index that a model with ``num_layers`` layers keeps (layer numbers below it) and,
    for a mixture of experts, ``num_experts`` routed experts (expert numbers below it)."""

    def number_after(parts: list[str], keys: tuple[str, ...]) -> int | None:
        return next((int(parts[i + 1]) for i, part in enumerate(parts[:-1])
                     if part in keys and parts[i + 1].isdigit()), None)

    names = set()
    for name in index["weight_map"]:
        parts = name.split(".")
        layer, expert = number_after(parts, ("layers", "blocks")), number_after(parts, ("experts",))
        if (layer is None or layer < num_layers) and (expert is None or num_experts is None or expert < num_experts):
            names.add(name)
    return names


def build_standin(family: str, folder: str | Path, *, source: str | Path | None = None,
                  tokenizer_source: str | Path | None = None, seed: int = 0, sizes: dict | None = None) -> Path:
    """Write a stand-in checkpoint of ``family`` into ``folder`` and return it.

    With ``source`` (a real checkpoint folder without weights, such as ``../shared/families/SDAR-4B-Chat``):
    its config shrunk, random weights under every kept name of its weight index (the names are checked
    against the model this project builds: a mismatch is an error), its tokenizer files copied (or, for
    LLaDA, a stand-in tokenizer with the real special ids and chat template) and its generation config.
    ``tokenizer_source``: where to take the tokenizer from when ``source`` has none (SDAR-4B's snapshot has
    only its config and index; every SDAR size shares SDAR-1.7B's tokenizer).
    Without ``source``: the project's small config of the family and the character tokenizer.
    """
    model_family = get_family(family)
    if sizes and source is None:
        raise ValueError("sizes= shrinks a real config: pass source= (a checkpoint folder) with it")
    if source is None and model_family.name in BUILDERS:
        return BUILDERS[model_family.name](folder, seed=seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if source is None:
        config = dict(SMALL_CONFIGS[model_family.name])
        _char_tokenizer().save_pretrained(folder)
        expected = None
    else:
        source = Path(source)
        config = shrink_config(json.loads((source / "config.json").read_text()), model_family.name, sizes)
        index_file = source / WEIGHT_INDEX
        expected = None
        if index_file.is_file():
            expected = kept_weight_names(json.loads(index_file.read_text()), _num_layers(config),
                                         config.get("num_experts"))
        if (source / "generation_config.json").is_file():
            shutil.copy(source / "generation_config.json", folder / "generation_config.json")
        tokenizer_source = Path(tokenizer_source) if tokenizer_source is not None else source
        for name in TOKENIZER_FILES:
            if (tokenizer_source / name).is_file():
                shutil.copy(tokenizer_source / name, folder / name)
        if not any((tokenizer_source / name).is_file() for name in ("tokenizer.json", "vocab.json")):
            if not (tokenizer_source / "tokenizer_config.json").is_file():
                raise FileNotFoundError(f"{tokenizer_source} has no tokenizer files; pass tokenizer_source=")
            _tokenizer_from_config(tokenizer_source, SNAPSHOT_SPECIAL_IDS.get(model_family.name)).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_random_weights(folder, model_family, expected, seed)
    return folder


def _num_layers(config: dict) -> int:
    return int(config.get("n_layers", config.get("num_hidden_layers", 0)))


def _write_random_weights(folder: Path, family: ModelFamily, expected: set[str] | None, seed: int) -> None:
    import transformers
    from safetensors.torch import save_file

    import dare_gym.models  # noqa: F401  (registers the families' classes)

    config = transformers.AutoConfig.from_pretrained(folder)
    torch.manual_seed(seed)
    model = getattr(transformers, family.auto_class).from_config(config)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if expected is not None and set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{family.name}: the model built from {folder}/config.json does not match the checkpoint's "
                         f"weight names: absent from the model {missing[:5]}, not in the checkpoint {extra[:5]}")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _char_tokenizer():
    from dare_gym.models.tokenizer import build_char_tokenizer

    return build_char_tokenizer(model_max_length=512)


def _tokenizer_from_config(source: Path, special_ids: dict[str, int] | None = None):
    """A stand-in for a tokenizer whose vocabulary file is not in the snapshot (LLaDA, LLaDA2): characters get small
    ids, every added token of ``tokenizer_config.json`` its real id (``special_ids``: ids of special tokens the
    snapshot does not record), and the real chat template is kept."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dare_gym.models.tokenizer import CHARACTERS

    settings = json.loads((source / "tokenizer_config.json").read_text())
    added = {int(i): entry for i, entry in settings.get("added_tokens_decoder", {}).items()}
    for content, token_id in (special_ids or {}).items():
        added.setdefault(token_id, {"content": content, "special": True})
    vocab = {entry["content"]: i for i, entry in added.items()}
    for char in ["<unk>", *CHARACTERS]:
        vocab.setdefault(char, len([v for v in vocab.values() if v < 1000]))  # small ids, below every added one
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(e["content"], special=bool(e.get("special", True)), normalized=False)
                             for _, e in sorted(added.items())])
    special = {key: settings[key] for key in ("bos_token", "eos_token", "pad_token", "mask_token")
               if isinstance(settings.get(key), str) and settings[key] in vocab}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", clean_up_tokenization_spaces=False,
                                        **special)
    tokenizer.chat_template = settings.get("chat_template")
    return tokenizer


__all__ = ["SHRINK", "SMALL_CONFIGS", "SNAPSHOT_SPECIAL_IDS", "build_standin", "kept_weight_names", "shrink_config"]
