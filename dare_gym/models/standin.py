"""Tiny stand-ins of real dLLM checkpoints, in the real format, for machines with no hub and no GPU.

A stand-in folder is what a loader of the real checkpoint sees, shrunk: the real ``config.json`` with its
sizes cut down (every other key kept, ``auto_map`` included), random weights under exactly the names of the
real weight index that the shrunk layer count keeps, and the real tokenizer files where the checkpoint ships
them (Dream, SDAR). LLaDA's snapshot has no ``tokenizer.json``: its stand-in tokenizer maps characters to
small ids and every added token of ``tokenizer_config.json`` (mask, EOS, EOT, chat headers) to its real id,
with the real chat template, so special ids and prompt formatting behave as with the real one.

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
}


# Families whose stand-in is written through their transformers config classes (name -> builder(folder, seed)):
# DiffusionGemma registers its own (dare_gym.models.diffusion_gemma.build_standin).
BUILDERS: dict = {}


def shrink_config(config: dict, family: str) -> dict:
    """The real config with its sizes replaced by :data:`SHRINK`'s; every other key is kept."""
    if family not in SHRINK:
        raise ValueError(f"no shrink rule for family {family!r}; known: {', '.join(SHRINK)}")
    shrunk = dict(config)
    shrunk.update(SHRINK[family])
    return shrunk


def kept_weight_names(index: dict, num_layers: int) -> set[str]:
    """The names of a weight index that a model with ``num_layers`` layers keeps (layer numbers below it)."""
    names = set()
    for name in index["weight_map"]:
        parts = name.split(".")
        layer = next((int(parts[i + 1]) for i, part in enumerate(parts[:-1])
                      if part in ("layers", "blocks") and parts[i + 1].isdigit()), None)
        if layer is None or layer < num_layers:
            names.add(name)
    return names


def build_standin(family: str, folder: str | Path, *, source: str | Path | None = None,
                  tokenizer_source: str | Path | None = None, seed: int = 0) -> Path:
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
        config = shrink_config(json.loads((source / "config.json").read_text()), model_family.name)
        index_file = source / WEIGHT_INDEX
        expected = None
        if index_file.is_file():
            expected = kept_weight_names(json.loads(index_file.read_text()), _num_layers(config))
        if (source / "generation_config.json").is_file():
            shutil.copy(source / "generation_config.json", folder / "generation_config.json")
        tokenizer_source = Path(tokenizer_source) if tokenizer_source is not None else source
        for name in TOKENIZER_FILES:
            if (tokenizer_source / name).is_file():
                shutil.copy(tokenizer_source / name, folder / name)
        if not any((tokenizer_source / name).is_file() for name in ("tokenizer.json", "vocab.json")):
            if not (tokenizer_source / "tokenizer_config.json").is_file():
                raise FileNotFoundError(f"{tokenizer_source} has no tokenizer files; pass tokenizer_source=")
            _tokenizer_from_config(tokenizer_source).save_pretrained(folder)
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


def _tokenizer_from_config(source: Path):
    """A stand-in for a tokenizer whose vocabulary file is not in the snapshot (LLaDA): characters get small
    ids, every added token of ``tokenizer_config.json`` its real id, and the real chat template is kept."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dare_gym.models.tokenizer import CHARACTERS

    settings = json.loads((source / "tokenizer_config.json").read_text())
    added = {int(i): entry for i, entry in settings.get("added_tokens_decoder", {}).items()}
    vocab = {entry["content"]: i for i, entry in added.items()}
    for char in ["<unk>", *CHARACTERS]:
        vocab.setdefault(char, len([v for v in vocab.values() if v < 1000]))  # small ids, below every added one
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(e["content"], special=bool(e.get("special", True)), normalized=False)
                             for _, e in sorted(added.items())])
    special = {key: settings[key] for key in ("bos_token", "eos_token", "pad_token") if isinstance(settings.get(key), str)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", clean_up_tokenization_spaces=False,
                                        **special)
    tokenizer.chat_template = settings.get("chat_template")
    return tokenizer


__all__ = ["SHRINK", "SMALL_CONFIGS", "build_standin", "kept_weight_names", "shrink_config"]
