"""Model families: the family owns the forward (masks, positions, shift), LLaDA / Dream / SDAR load in their
checkpoints' format, and everything downstream (sampler, algorithms) runs on each.

Stand-ins come from ``dare_gym.models.standin``: the project's own small configs (always run), or the real
config / weight-name / tokenizer files of ``../shared/families`` (DARE_GYM_FAMILIES_DIR) shrunk.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import dare_gym
from dare_gym.models.families import family_for_model_type, get_family
from dare_gym.models.standin import build_standin, kept_weight_names
from dare_gym.train.trainer import GenerationConfig, TrainConfig, Trainer

FAMILIES = ("llada", "dream", "sdar")


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    folders = {name: build_standin(name, root / name) for name in FAMILIES}
    tiny_block = root / "tiny_block"
    policy = dare_gym.load_policy("tiny")
    policy.model.config.block_size = 4  # the block-causal variant of the tiny architecture
    policy.save_pretrained(tiny_block)
    folders["tiny_block"] = tiny_block
    return folders


def _policy(folder):
    policy = dare_gym.load_policy(folder)
    policy.model.eval()
    return policy


def _ids(policy, texts):
    return [policy.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.mark.parametrize("name", [*FAMILIES, "tiny_block"])
def test_aligned_logits_ignore_left_padding_right_padding_and_batching(standins, name):
    policy = _policy(standins[name])
    rows = _ids(policy, ["sort 5813\n", "sort 90\n?", "abc"])
    pad = policy.tokenizer.pad_token_id
    alone = [policy.logits(torch.tensor([r]))[0] for r in rows]
    width = max(map(len, rows)) + 2
    left = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    left_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    right = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    right_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    batched_left = policy.logits(left, left_mask)
    batched_right = policy.logits(right, right_mask)
    for row, reference in zip(range(len(rows)), alone):
        n = len(rows[row])
        torch.testing.assert_close(batched_left[row, width - n:], reference, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(batched_right[row, :n], reference, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["sdar", "tiny_block"])
def test_block_causal_later_blocks_never_change_earlier_ones(standins, name):
    policy = _policy(standins[name])
    assert policy.block_size == 4
    ids = torch.tensor(_ids(policy, ["abcdefghijkl"]))  # three blocks of 4
    base = policy.logits(ids)
    later = ids.clone()
    later[0, 9] = later[0, 2]  # edit inside block 2
    edited = policy.logits(later)
    torch.testing.assert_close(edited[:, :8], base[:, :8], atol=0, rtol=0)  # blocks 0 and 1 untouched
    assert not torch.allclose(edited[:, 8:], base[:, 8:])  # block 2 sees its own edit (bidirectionally)
    assert not torch.allclose(edited[0, 8], base[0, 8])  # ... even at the block's first position


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_full_attention_families_see_the_whole_sequence(standins, name):
    policy = _policy(standins[name])
    ids = torch.tensor(_ids(policy, ["abcdefgh"]))
    edited = ids.clone()
    edited[0, -1] = ids[0, 0]
    # position 2 reads the last token (for Dream, the logit aligned to token 2 is computed at position 1)
    assert not torch.allclose(policy.logits(ids)[0, 2], policy.logits(edited)[0, 2])


def _hand_mask(real: list[list[int]], block_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The additive mask and positions, written with loops: key k is visible to query q iff k is real and,
    block-causally, k's block (by count of real tokens) is not after q's."""
    batch, width = len(real), len(real[0])
    mask = torch.full((batch, 1, width, width), torch.finfo(torch.float32).min)
    positions = torch.zeros(batch, width, dtype=torch.long)
    for b in range(batch):
        count = -1
        for i in range(width):
            count += real[b][i]
            positions[b, i] = max(count, 0)
        for q in range(width):
            for k in range(width):
                if real[b][k] and (block_size is None or positions[b, k] // block_size <= positions[b, q] // block_size):
                    mask[b, 0, q, k] = 0.0
    return mask, positions


@pytest.mark.parametrize("name, native", [("dream", "Qwen2"), ("sdar", "Qwen3")])
def test_dream_and_sdar_equal_native_qwen_with_a_hand_built_mask(standins, name, native):
    import transformers

    folder = standins[name]
    policy = _policy(folder)
    config = json.loads((folder / "config.json").read_text())
    config_class = getattr(transformers, f"{native}Config")
    model_class = getattr(transformers, f"{native}ForCausalLM")
    keys = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "block_size", "mask_token_id")}
    model = model_class(config_class(**keys)).eval()
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    rows = _ids(policy, ["sort 5813\n", "x = 12"])
    width = max(map(len, rows))
    pad = policy.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    real = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    mask, positions = _hand_mask(real, config.get("block_size") if name == "sdar" else None)
    raw = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    ours = policy.logits(ids, torch.tensor(real))
    for b, row in enumerate(rows):
        first = width - len(row)
        if name == "dream":  # logit j-1 predicts token j
            torch.testing.assert_close(ours[b, first + 1:], raw[b, first:-1], atol=1e-5, rtol=1e-4)
        else:
            torch.testing.assert_close(ours[b, first:], raw[b, first:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", [*FAMILIES, "tiny_block"])
def test_logits_to_keep_returns_the_last_positions_of_the_full_forward(standins, name):
    policy = _policy(standins[name])
    rows = _ids(policy, ["sort 5813\n", "ab"])
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    full = policy.logits(ids, mask)
    torch.testing.assert_close(policy.logits(ids, mask, logits_to_keep=3), full[:, -3:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["sdar", "tiny_block"])
def test_block_causal_cache_of_finished_blocks_is_exact(standins, name):
    """The cache hook: keys of complete blocks, cached once, give the same logits for the next block as a
    full forward (block-causal attention never lets a finished block see later ones)."""
    from transformers import DynamicCache

    policy = _policy(standins[name])
    ids = torch.tensor(_ids(policy, ["abcdefghijkl"]))
    full = policy.logits(ids)
    cache = DynamicCache()
    policy.logits(ids[:, :8], cache=cache)  # two finished blocks
    assert cache.get_seq_length() == 8
    step = policy.logits(ids[:, 8:], torch.ones_like(ids), cache=cache)
    torch.testing.assert_close(step, full[:, 8:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", [*FAMILIES, "tiny_block"])
def test_the_default_sampler_runs_on_every_family(standins, name):
    policy = _policy(standins[name])
    assert policy.default_sampler == ("block_diffusion" if policy.block_size else "llada")
    settings = dict(gen_length=8, temperature=0.7) if policy.block_size else \
        dict(gen_length=8, steps=8, block_length=4, temperature=0.7)
    out, stats = policy.generate(["sort 12\n", "hi"], seed=0, return_stats=True, **settings)
    assert len(out) == 2 and stats["model_calls"] > 0
    for completion in out:
        assert completion.completion_ids.shape == (8,)
        assert ((completion.unmask_step >= 0) & (completion.unmask_step < stats["model_calls"])).all()
    again = policy.generate(["sort 12\n", "hi"], seed=0, **settings)
    assert [c.completion_ids.tolist() for c in again] == [c.completion_ids.tolist() for c in out]
    others = [policy.generate(["hi"], seed=s, **dict(settings, temperature=1.0))[0] for s in range(4)]
    assert len({tuple(c.completion_ids.tolist()) for c in others}) > 1  # temperature is honoured


def _varied_reward(completion: str, sample) -> float:
    return (sum(map(ord, completion)) % 5) / 4  # a signal for a random model: rewards differ within groups


UPDATE_RECIPES = {"d1": {}, "coupled_grpo": {}, "bgpo": {}, "ebpo": {"mc_num": 2}}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("algorithm", UPDATE_RECIPES)
def test_algorithms_complete_an_update_on_every_family(standins, tmp_path, name, algorithm):
    config = TrainConfig(
        env="digitsort-v0", policy=str(standins[name]), algorithm={"name": algorithm, **UPDATE_RECIPES[algorithm]},
        prompts_per_step=2,
        group_size=4, max_steps=1, eval_size=0, output_dir=str(tmp_path), progress=False,
        env_kwargs={"reward": _varied_reward},
        rollout=GenerationConfig(gen_length=8, temperature=1.0) if name == "sdar" else
        GenerationConfig(gen_length=8, steps=8, block_length=4, temperature=1.0),
    )
    trainer = Trainer(config)
    before = {k: v.clone() for k, v in trainer.policy.model.state_dict().items()}
    buffer, stats = trainer.collect()
    assert stats["reward_std"] > 0
    update = trainer.update(buffer)
    assert update["rows_trained"] > 0 and torch.isfinite(torch.tensor(update["loss"]))
    assert algorithm != "ebpo" or update["elbo"] < 0  # EBPO's block ELBO of a real sequence
    after = trainer.policy.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_unknown_model_type_is_an_error_that_lists_families_and_family_overrides(standins, tmp_path):
    folder = tmp_path / "odd"
    build_standin("llada", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, model_type="my_dllm")))
    with pytest.raises(ValueError) as error:
        dare_gym.load_policy(folder)
    message = str(error.value)
    assert "'my_dllm'" in message and "llada" in message and "sdar" in message and "family=" in message
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        family_for_model_type("gpt2")
    assert get_family("dream").shift_logits and get_family("sdar").block_size_key == "block_size"


# ---------------------------------------------------------------------------------- the real files


REAL = [  # (family, folder, tokenizer folder, mask id, end-of-turn id)
    ("llada", "LLaDA-8B-Instruct", None, 126336, 126348),
    ("dream", "Dream-v0-Instruct-7B", None, 151666, 151645),
    ("sdar", "SDAR-1dot7B-Chat", None, 151669, 151645),
    ("sdar", "SDAR-4B-Chat", "SDAR-1dot7B-Chat", 151669, 151645),
]


@pytest.mark.parametrize("family, folder, tokenizer_folder, mask_id, eot_id", REAL)
def test_real_checkpoint_files_load_with_every_weight_used(families_dir, tmp_path, family, folder, tokenizer_folder,
                                                           mask_id, eot_id):
    source = families_dir / folder
    standin = build_standin(family, tmp_path / folder, source=source,
                            tokenizer_source=tokenizer_folder and families_dir / tokenizer_folder)
    real_config = json.loads((source / "config.json").read_text())
    written = json.loads((standin / "config.json").read_text())
    assert set(written) == set(real_config)  # every key kept, only sizes shrunk
    import transformers

    model, info = getattr(transformers, get_family(family).auto_class).from_pretrained(standin, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    names = set(load_file(str(standin / "model.safetensors")))
    assert names == set(model.state_dict())  # every tensor of the folder is used
    if (source / "model.safetensors.index.json").is_file():
        index = json.loads((source / "model.safetensors.index.json").read_text())
        assert names == kept_weight_names(index, written.get("n_layers", written.get("num_hidden_layers")))
    else:  # SDAR-1.7B ships one file: its names must follow every dense SDAR size's index (SDAR-4B's)
        index = json.loads((families_dir / "SDAR-4B-Chat" / "model.safetensors.index.json").read_text())
        assert names == kept_weight_names(index, written["num_hidden_layers"])

    policy = dare_gym.load_policy(standin)
    assert policy.family.name == family
    assert policy.mask_token_id == mask_id == real_config["mask_token_id"]
    assert eot_id in policy.stop_token_ids and policy.tokenizer.eos_token_id in policy.stop_token_ids
    assert policy.chat_template  # instruct checkpoints: prompts go through the chat template
    prompt_ids, _ = policy.encode_prompts(["What is 2+2?"])
    text = policy.tokenizer.decode(prompt_ids[0])
    assert "What is 2+2?" in text and text != "What is 2+2?"
    settings = dict(gen_length=8) if policy.block_size else dict(gen_length=8, steps=8, block_length=4)
    out = policy.generate(["What is 2+2?"], temperature=0.7, seed=0, **settings)
    assert out[0].completion_ids.shape == (8,)


def test_dare_gym_train_starts_on_a_checkpoint_folder_in_bfloat16(families_dir, tmp_path):
    """What a new user types: `dare-gym train policy=<folder> device=auto dtype=bfloat16`, here on an SDAR
    stand-in built from the real files (block-causal: the block_diffusion sampler by default)."""
    import subprocess
    import sys

    folder = build_standin("sdar", tmp_path / "sdar", source=families_dir / "SDAR-1dot7B-Chat")
    done = subprocess.run(
        [sys.executable, "-m", "dare_gym", "train", f"policy={folder}", "device=auto", "dtype=bfloat16",
         "max_steps=1", "time_limit_minutes=null", "prompts_per_step=2", "group_size=2", "eval_size=2",
         "progress=false", f"output_dir={tmp_path / 'run'}", "rollout={temperature: 1.0, gen_length: 8}",
         "evaluation={gen_length: 8}"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 1
    saved = json.loads((tmp_path / "run" / "final_policy" / "dare_gym_policy.json").read_text())
    assert saved["family"] == "sdar" and saved["chat_template"] is True
