"""LLaDA2.x (MoE, block diffusion): the project's own implementation under the checkpoint's names.

Fidelity: a shrunk LLaDA2.0-mini built from ``../shared/families/LLaDA2.0-mini`` (3 layers, 16 experts, the real
vocabulary and weight names; weights re-drawn at a scale where every part of the network moves the logits, the
expert bias included) computes what :func:`reference_logits` computes. That reference is written independently
from the official modeling code's formulas: float64, token by token, head by head, expert by expert, reading the
tensors from the folder's safetensors file by their checkpoint names, with plain Python sorting for the router.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import dare_gym
from dare_gym.models.llada2 import LLaDA2MoeConfig, additive_mask
from dare_gym.models.standin import SNAPSHOT_SPECIAL_IDS, build_standin, kept_weight_names

MINI = "LLaDA2.0-mini"


# ------------------------------------------------------------------------------------------ the reference


def _rms(vector: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return vector / math.sqrt(float((vector * vector).mean()) + eps) * weight


def _rope(vector: torch.Tensor, position: int, rotary: int, theta: float) -> torch.Tensor:
    """Rotate-half RoPE on the first ``rotary`` dimensions, written pair by pair: dimension i < rotary/2 turns
    with dimension i + rotary/2 by the angle position · θ^(−2i/rotary); the rest pass through."""
    out = vector.clone()
    half = rotary // 2
    for i in range(half):
        angle = position * theta ** (-2 * i / rotary)
        a, b = vector[i], vector[i + half]
        out[i] = a * math.cos(angle) - b * math.sin(angle)
        out[i + half] = b * math.cos(angle) + a * math.sin(angle)
    return out


def _swiglu(weights: dict, prefix: str, vector: torch.Tensor) -> torch.Tensor:
    gate = weights[prefix + "gate_proj.weight"] @ vector
    up = weights[prefix + "up_proj.weight"] @ vector
    return weights[prefix + "down_proj.weight"] @ (gate / (1 + torch.exp(-gate)) * up)


def _route(weights: dict, prefix: str, config: dict, vector: torch.Tensor) -> list[tuple[int, float]]:
    """(expert, weight) pairs the router gives one token: sigmoid scores, expert bias for the choice only, groups
    ranked by the sum of their two best biased scores, the best ``topk_group`` groups, the best k experts there,
    weights = unbiased scores normalised to 1 and scaled."""
    experts, groups = config["num_experts"], config["n_group"]
    size = experts // groups
    scores = [1 / (1 + math.exp(-float(weights[prefix + "gate.weight"][e] @ vector))) for e in range(experts)]
    biased = [scores[e] + float(weights[prefix + "gate.expert_bias"][e]) for e in range(experts)]
    group_score = [sum(sorted(biased[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(groups)]
    best_groups = sorted(range(groups), key=lambda g: -group_score[g])[:config["topk_group"]]
    candidates = [e for g in best_groups for e in range(g * size, (g + 1) * size)]
    chosen = sorted(candidates, key=lambda e: -biased[e])[:config["num_experts_per_tok"]]
    total = sum(scores[e] for e in chosen)
    return [(e, scores[e] / total * config["routed_scaling_factor"]) for e in chosen]


def reference_logits(weights: dict, config: dict, ids: list[int], positions: list[int], visible) -> torch.Tensor:
    """Logits [T, V] of one sequence. ``visible(q, k)``: whether token q attends to token k."""
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["head_dim"]
    rotary, theta, eps = int(head_dim * config["partial_rotary_factor"]), config["rope_theta"], config["rms_norm_eps"]
    length = len(ids)
    x = [weights["model.word_embeddings.weight"][t].clone() for t in ids]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        normed = [_rms(v, weights[p + "input_layernorm.weight"], eps) for v in x]
        fused = [weights[p + "attention.query_key_value.weight"] @ v for v in normed]  # heads: H queries, KV keys, KV values

        def head(t: int, index: int) -> torch.Tensor:
            return fused[t][index * head_dim:(index + 1) * head_dim]

        q = [[_rope(_rms(head(t, h), weights[p + "attention.query_layernorm.weight"], eps), positions[t], rotary, theta)
              for h in range(heads)] for t in range(length)]
        k = [[_rope(_rms(head(t, heads + g), weights[p + "attention.key_layernorm.weight"], eps), positions[t], rotary,
                    theta) for g in range(kv_heads)] for t in range(length)]
        v = [[head(t, heads + kv_heads + g) for g in range(kv_heads)] for t in range(length)]
        new = []
        for t in range(length):
            per_head = []
            for h in range(heads):
                g = h // (heads // kv_heads)
                keys = [s for s in range(length) if visible(t, s)]
                logits = torch.stack([q[t][h] @ k[s][g] / math.sqrt(head_dim) for s in keys])
                probs = torch.exp(logits - logits.max())
                probs = probs / probs.sum()
                per_head.append(sum(probs[i] * v[s][g] for i, s in enumerate(keys)))
            new.append(x[t] + weights[p + "attention.dense.weight"] @ torch.cat(per_head))
        x = []
        for t in range(length):
            m = _rms(new[t], weights[p + "post_attention_layernorm.weight"], eps)
            if layer < config["first_k_dense_replace"]:
                out = _swiglu(weights, p + "mlp.", m)
            else:
                out = sum(w * _swiglu(weights, p + f"mlp.experts.{e}.", m) for e, w in _route(weights, p + "mlp.", config, m))
                out = out + _swiglu(weights, p + "mlp.shared_experts.", m)
            x.append(new[t] + out)
    final = [_rms(v, weights["model.norm.weight"], eps) for v in x]
    return torch.stack([weights["lm_head.weight"] @ v for v in final])


def block_causal(positions: list[int], block: int):
    return lambda q, k: positions[k] // block <= positions[q] // block


# ------------------------------------------------------------------------------------------ stand-ins


def scramble(folder, seed: int = 0) -> dict:
    """Re-draw a stand-in's weights where every part matters: unit-scale activations, RMSNorm gains around 1,
    an expert bias as large as the score differences (so it changes choices). Returns the float64 tensors."""
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(str(folder / "model.safetensors"))
    scrambled = {}
    for name, tensor in sorted(tensors.items()):
        if name.endswith("expert_bias"):
            value = 0.05 * torch.randn(tensor.shape, generator=generator)
        elif name.endswith("norm.weight") or "layernorm" in name:
            value = 1 + 0.3 * torch.randn(tensor.shape, generator=generator)
        elif name == "model.word_embeddings.weight":
            value = torch.randn(tensor.shape, generator=generator)
        else:  # [out, in] projections, the router and the head
            value = torch.randn(tensor.shape, generator=generator) / math.sqrt(tensor.shape[1])
        scrambled[name] = value.to(tensor.dtype).contiguous()
    save_file(scrambled, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return {name: value.double() for name, value in scrambled.items()}


@pytest.fixture(scope="module")
def mini(families_dir, tmp_path_factory):
    """(folder, float64 weights, config) of the shrunk LLaDA2.0-mini stand-in from the real files."""
    folder = build_standin("llada2", tmp_path_factory.mktemp("llada2") / "mini", source=families_dir / MINI)
    weights = scramble(folder)
    return folder, weights, json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The project's own small LLaDA2 config (character tokenizer, blocks of 4), always available."""
    folder = build_standin("llada2", tmp_path_factory.mktemp("llada2") / "small")
    weights = scramble(folder, seed=1)
    return folder, weights, json.loads((folder / "config.json").read_text())


def _policy(folder):
    policy = dare_gym.load_policy(folder, dtype="float32")
    policy.model.eval()
    return policy


ROWS = [[5, 900, 17, 44, 12_000, 7, 150_000, 3, 61, 99, 2048, 31_337, 8, 77],  # 14 tokens
        [1000, 20, 156_000, 4, 4, 88],
        [71, 72, 73, 74, 75, 76, 77, 78, 79]]


def _rows(vocab: int) -> list[list[int]]:
    return [[t % vocab for t in row] for row in ROWS]


@pytest.mark.parametrize("which", ["mini", "small"])
def test_forward_equals_the_reference_with_and_without_left_padding(request, which):
    folder, weights, config = request.getfixturevalue(which)
    policy = _policy(folder)
    block = policy.block_size
    rows = _rows(config["vocab_size"])
    pad = policy.tokenizer.pad_token_id
    width = max(map(len, rows))
    batch = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        alone = policy.logits(torch.tensor([rows[0]]))[0]
        padded = policy.logits(batch, mask)
    worst = 0.0
    for b, row in enumerate(rows):
        positions = list(range(len(row)))
        expected = reference_logits(weights, config, row, positions, block_causal(positions, block))
        worst = max(worst, float((padded[b, width - len(row):].double() - expected).abs().max()))
        if b == 0:
            worst = max(worst, float((alone.double() - expected).abs().max()))
    scale = float(expected.abs().max())
    print(f"{which}: max |ours - reference| = {worst:.2e} (logits up to {scale:.1f})")
    assert scale > 1 and worst < 1e-5 * scale


def test_blocks_of_32_under_a_two_block_prompt_and_the_block_size_key(mini):
    """The real config has no block_size key: the family reads 32; a 40-token row spans two blocks and the
    reference agrees only with block-causal attention on blocks of 32."""
    folder, weights, config = mini
    policy = _policy(folder)
    assert "block_size" not in config and policy.block_size == 32
    row = [(7 * i + 3) % config["vocab_size"] for i in range(40)]
    with torch.no_grad():
        ours = policy.logits(torch.tensor([row]))[0].double()
    positions = list(range(40))
    expected = reference_logits(weights, config, row, positions, block_causal(positions, 32))
    assert float((ours - expected).abs().max()) < 1e-5 * float(expected.abs().max())
    bidirectional = reference_logits(weights, config, row, positions, lambda q, k: True)
    assert float((ours[:32] - bidirectional[:32]).abs().max()) > 1e-2  # the first block must not see the second


# ------------------------------------------------------------------------------------------ the real files


def test_the_real_files_load_with_every_tensor_used(families_dir, tmp_path):
    import transformers

    source = families_dir / MINI
    folder = build_standin("llada2", tmp_path / "mini", source=source)
    real = json.loads((source / "config.json").read_text())
    written = json.loads((folder / "config.json").read_text())
    assert set(written) == set(real) and written["vocab_size"] == real["vocab_size"] == 157184
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    names = set(load_file(str(folder / "model.safetensors")))
    index = json.loads((source / "model.safetensors.index.json").read_text())
    assert names == set(model.state_dict()) == kept_weight_names(index, 3, 16)
    assert len(index["weight_map"]) == 14813 and len(names) == 3 + 9 + 2 * (6 + 2 + 3 + 16 * 3)  # 1 dense layer, 2 MoE
    assert sum(name.endswith("expert_bias") for name in names) == 2  # a buffer, stored like the checkpoint's
    backbone = transformers.AutoModel.from_pretrained(folder)
    assert type(backbone).__name__ == "LLaDA2MoeModel" and not hasattr(backbone, "lm_head")  # as upstream

    policy = dare_gym.load_policy(folder)
    assert policy.family.name == "llada2" and policy.block_size == 32 and policy.default_sampler == "block_diffusion"
    ids = SNAPSHOT_SPECIAL_IDS["llada2"]
    assert policy.mask_token_id == ids["<|mask|>"] == 156895
    assert policy.tokenizer.eos_token_id == policy.tokenizer.pad_token_id == real["pad_token_id"] == 156892
    assert policy.stop_token_ids == [156892, ids["<|role_end|>"]] and policy.chat_template
    prompt_ids, _ = policy.encode_prompts(["What is 2+2?"])
    assert policy.tokenizer.decode(prompt_ids[0]) == ("<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN"
                                                      "</role>What is 2+2?<|role_end|><role>ASSISTANT</role>")
    assert next(policy.model.parameters()).dtype == torch.bfloat16  # the checkpoint's dtype
    router = policy.model.model.layers[1].mlp.gate
    assert router.weight.dtype == router.expert_bias.dtype == torch.float32  # router_dtype fp32


def test_unsupported_config_values_are_named(families_dir):
    config = json.loads((families_dir / MINI / "config.json").read_text())
    with pytest.raises(ValueError, match="score_function='softmax'"):
        LLaDA2MoeConfig(**dict(config, score_function="softmax"))
    with pytest.raises(ValueError, match="router_dtype='bf16'"):
        LLaDA2MoeConfig(**dict(config, router_dtype="bf16"))
    with pytest.raises(ValueError, match="num_experts_per_tok=200"):
        LLaDA2MoeConfig(**dict(config, num_experts_per_tok=200))
    with pytest.raises(ValueError, match="n_group=7"):
        LLaDA2MoeConfig(**dict(config, n_group=7))
    with pytest.raises(ValueError, match="rope_scaling"):
        LLaDA2MoeConfig(**dict(config, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    assert LLaDA2MoeConfig(**config).rope_dim == 64


# ------------------------------------------------------------------------------------------ masks


def test_every_mask_convention_gives_the_block_causal_forward(mini):
    """LLaDA2.0's log mask (0 / −inf in bf16, as its generate() builds it), LLaDA2.1's 0/1 mask, a boolean mask,
    a 2D padding mask and no mask all give the reference's block-causal logits on a row spanning two blocks of
    32; upstream's reading of the 0/1 mask (added as a bias) would let block 0 see block 1."""
    folder, weights, config = mini
    policy = _policy(folder)
    length = 40
    row = torch.tensor([[(11 * i + 5) % config["vocab_size"] for i in range(length)]])
    blocks = torch.arange(length) // 32
    allowed = (blocks[None, :] <= blocks[:, None])[None, None]  # [1, 1, L, L]
    ones = allowed.to(torch.bfloat16)
    conventions = {"2.0 log": ones.log(), "2.1 zero/one": ones, "bool": allowed,
                   "2D": torch.ones(1, length, dtype=torch.long), "none": None}
    positions = list(range(length))
    expected = reference_logits(weights, config, row[0].tolist(), positions, block_causal(positions, 32))
    for name, mask in conventions.items():
        with torch.no_grad():
            logits = policy.model(row, attention_mask=mask).logits[0].double()
        assert float((logits - expected).abs().max()) < 1e-5 * float(expected.abs().max()), name
    assert torch.equal(additive_mask(ones, torch.float32) == 0, allowed)
    # Upstream adds the 0/1 mask as a bias: the same as the additive mask {0 visible, −1 "hidden"} (a constant shift
    # of every key's score), under which block 0 reads block 1.
    with torch.no_grad():
        upstream_reading = policy.model(row, attention_mask=ones.float() - 1).logits[0].double()
    assert float((upstream_reading[:32] - expected[:32]).abs().max()) > 1e-2
    with pytest.raises(ValueError, match=r"\(batch, 1, 40, 40\).*got \(1, 1, 40, 39\)"):
        policy.model(row, attention_mask=allowed[..., :39])
    with pytest.raises(ValueError, match="3D mask"):
        policy.model(row, attention_mask=allowed[0])
