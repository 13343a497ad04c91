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


def test_right_padding_and_logits_to_keep(small):
    folder, _, config = small
    policy = _policy(folder)
    rows = _rows(config["vocab_size"])
    width = max(map(len, rows))
    right = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        batched = policy.logits(right, mask)
        kept = policy.logits(right, mask, logits_to_keep=3)
        for b, row in enumerate(rows):
            torch.testing.assert_close(batched[b, :len(row)], policy.logits(torch.tensor([row]))[0], atol=2e-5,
                                       rtol=1e-4)
    torch.testing.assert_close(kept, batched[:, -3:], atol=1e-5, rtol=1e-5)


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


# ------------------------------------------------------------------------------- block diffusion, cache


def test_noisy_clean_training_forward_scores_each_block_as_decoding_sees_it(small):
    """The doubled [x_0 ; x_t] forward (MODEL_FAMILIES §6 / ALGORITHMS.md §B) on a left-padded batch: noisy block i
    of every row equals the reference on [clean blocks < i ; noisy block i]."""
    folder, weights, config = small
    policy = _policy(folder)
    block, mask_id = policy.block_size, policy.mask_token_id
    generator = torch.Generator().manual_seed(0)
    clean_rows = [torch.randint(5, 100, (n,), generator=generator).tolist() for n in (11, 6, 9)]
    noisy_rows = [[mask_id if torch.rand(1, generator=generator) < 0.5 else t for t in row] for row in clean_rows]
    width = max(map(len, clean_rows))

    def padded(rows):
        return torch.tensor([[0] * (width - len(r)) + r for r in rows])

    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in clean_rows])
    with torch.no_grad():
        doubled = policy.family.noisy_clean_forward(policy.model, padded(noisy_rows), padded(clean_rows), mask,
                                                    block_size=block)
    checked = 0
    for b, (clean, noisy) in enumerate(zip(clean_rows, noisy_rows)):
        for start in range(0, len(clean), block):
            end = min(start + block, len(clean))
            ids = clean[:start] + noisy[start:end]
            positions = list(range(len(ids)))
            expected = reference_logits(weights, config, ids, positions, block_causal(positions, block))[start:]
            ours = doubled[b, width - len(clean) + start:width - len(clean) + end].double()
            assert float((ours - expected).abs().max()) < 1e-5 * float(expected.abs().max())
            checked += 1
    assert checked == 3 + 2 + 3


def test_the_cache_of_finished_blocks_is_exact(small):
    from transformers import DynamicCache

    folder, weights, config = small
    policy = _policy(folder)
    ids = torch.tensor([list(range(20, 32))])  # three blocks of 4
    cache = DynamicCache()
    with torch.no_grad():
        policy.logits(ids[:, :8], cache=cache)
        step = policy.logits(ids[:, 8:], torch.ones_like(ids), cache=cache)
    assert cache.get_seq_length() == 12
    positions = list(range(12))
    expected = reference_logits(weights, config, ids[0].tolist(), positions, block_causal(positions, 4))[8:]
    assert float((step[0].double() - expected).abs().max()) < 1e-5 * float(expected.abs().max())


def test_block_diffusion_decodes_from_the_cache_what_a_full_forward_predicts(small):
    """Greedy block_diffusion, one token a step: its first commit is the most confident masked position of the
    first block under a plain forward of [prompt ; masks] (no cache), and decoding is deterministic; sampling at
    temperature 1 varies."""
    folder, _, _ = small
    policy = _policy(folder)
    prompt = "sort 583920\n"
    settings = dict(gen_length=8, steps_per_block=4, remasking_strategy="low_confidence_static", temperature=0.0)
    out, stats = policy.generate([prompt], return_stats=True, **settings)
    assert out[0].completion_ids.shape == (8,) and stats["model_calls"] >= 2
    prompt_ids, _ = policy.encode_prompts([prompt])
    length = prompt_ids.shape[1]
    first_block_end = (length // 4 + 1) * 4
    x = torch.cat([prompt_ids, torch.full((1, first_block_end - length), policy.mask_token_id)], dim=1)
    with torch.no_grad():
        probs = torch.softmax(policy.logits(x)[0, length:].double(), dim=-1)
    probs[:, policy.mask_token_id] = 0
    best = probs.max(dim=-1)
    first = int(best.values.argmax())
    committed_first = int((out[0].unmask_step == out[0].unmask_step.min()).nonzero()[0])
    assert committed_first == first and int(out[0].completion_ids[first]) == int(best.indices[first])
    assert policy.generate([prompt], **settings)[0].completion_ids.tolist() == out[0].completion_ids.tolist()
    samples = {tuple(policy.generate([prompt], **dict(settings, temperature=1.0), seed=s)[0].completion_ids.tolist())
               for s in range(4)}
    assert len(samples) > 1


# ------------------------------------------------------------------------------------------ routing


def _loss(policy, ids):
    return policy.logits(ids).float().logsumexp(-1).mean()


def test_routing_is_the_same_in_the_rollout_and_the_update(mini):
    """bf16 weights, float32 router: the no-grad eval forward of a rollout and the train-mode forward of an
    update (with gradient checkpointing) choose the same experts for every token of every MoE layer."""
    from dare_gym.core.precision import enable_activation_checkpointing

    folder, _, config = mini
    policy = dare_gym.load_policy(folder, dtype="bfloat16")
    ids = torch.tensor([[(13 * i + 1) % config["vocab_size"] for i in range(24)]])
    policy.model.eval()
    with torch.no_grad():
        rollout = policy.model(ids, output_router_indices=True).router_indices
    policy.model.train()
    enable_activation_checkpointing(policy.model)
    update = policy.model(ids, output_router_indices=True)
    update.logits.float().mean().backward()
    assert len(rollout) == 2 and all(torch.equal(a, b) for a, b in zip(rollout, update.router_indices))
    assert all(r.shape == (1, 24, 4) for r in rollout)


def test_every_expert_gets_a_gradient_and_the_expert_bias_is_not_trained(small):
    """Under autograd every expert runs (unused ones on an empty slice: a zero gradient, so data-parallel ranks
    reduce the same tensors); an optimizer step changes the router's weight, never its expert-bias buffer."""
    from dare_gym.core.precision import MasterWeightAdamW

    folder, _, _ = small
    policy = _policy(folder)
    policy.model.train()
    ids = torch.tensor([[20, 21, 22]])  # 3 tokens × 2 choices: most of the 8 experts get none
    used = set()
    with torch.no_grad():
        for chosen in policy.model(ids, output_router_indices=True).router_indices:
            used.add(len(set(chosen.flatten().tolist())))
    optimizer = MasterWeightAdamW(policy.model.parameters(), lr=1e-2)
    _loss(policy, ids).backward()
    block = policy.model.model.layers[1].mlp
    grads = [p.grad for expert in block.experts for p in expert.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) == 0 for g in grads)
    assert max(used) < 8
    bias, weight = block.gate.expert_bias.clone(), block.gate.weight.detach().clone()
    assert "model.layers.1.mlp.gate.expert_bias" not in dict(policy.model.named_parameters())
    optimizer.clip_and_step(1.0)
    assert torch.equal(block.gate.expert_bias, bias) and not torch.equal(block.gate.weight, weight)


def test_expert_bias_balancing_moves_towards_under_used_experts_only_when_asked(small):
    folder, _, _ = small
    policy = _policy(folder)
    model = policy.model
    with pytest.raises(ValueError, match="track_expert_load"):
        model.update_expert_bias(0.01)
    model.track_expert_load()
    with torch.no_grad():
        model(torch.tensor([list(range(30, 60))]))
    block = model.model.layers[2].mlp
    load, before = block.expert_load.clone(), block.gate.expert_bias.clone()
    assert load.sum() == 30 * 2
    model.update_expert_bias(0.01)
    step = block.gate.expert_bias - before
    assert torch.equal(step > 0, load < load.mean()) and torch.equal(step < 0, load > load.mean())
    assert block.expert_load.sum() == 0
    with pytest.raises(ValueError, match="rate must be > 0, got 0"):
        model.update_expert_bias(0)


# ------------------------------------------------------------------------------------- training parts


def test_lora_targets_attention_and_dense_mlps_by_default_and_experts_on_request(small, tmp_path):
    from dare_gym.core.lora import LoraSettings, apply_lora, save_lora_policy

    folder, _, _ = small
    policy = apply_lora(_policy(folder), LoraSettings(r=4, alpha=8), verbose=False)
    adapted = {"layers." + name.rsplit(".lora_A", 1)[0].split(".layers.", 1)[-1]
               for name, _ in policy.model.named_parameters() if ".lora_A" in name}
    assert "layers.0.attention.query_key_value" in adapted and "layers.2.attention.dense" in adapted
    assert "layers.0.mlp.gate_proj" in adapted and "layers.1.mlp.shared_experts.down_proj" in adapted
    assert not any(".experts." in name for name in adapted) and not any("lm_head" in n for n in adapted)
    assert len(adapted) == 3 * 2 + 3 + 2 * 3
    with torch.no_grad():  # a trained adapter (B ≠ 0) that the saved checkpoints must reproduce
        for name, parameter in policy.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    ids = torch.tensor([[40, 41, 42, 43, 44, 45]])
    with torch.no_grad():
        trained = policy.logits(ids)
    for merged in (False, True):
        saved = save_lora_policy(policy, tmp_path / f"merged{merged}", merged=merged)
        with torch.no_grad():
            torch.testing.assert_close(_policy(saved).logits(ids), trained, atol=1e-5, rtol=1e-4)
    everything = apply_lora(_policy(folder), LoraSettings(r=4, alpha=8, target_modules="all-linear"), verbose=False)
    assert any(".experts.7.up_proj.lora_A" in name for name, _ in everything.model.named_parameters())


def test_gradient_checkpointing_gives_the_same_gradients(small):
    from dare_gym.core.precision import enable_activation_checkpointing

    folder, _, _ = small
    ids = torch.tensor([[20, 21, 22, 23, 24, 25, 26, 27, 28]])
    gradients = []
    for checkpointing in (False, True):
        policy = _policy(folder)
        policy.model.train()
        if checkpointing:
            enable_activation_checkpointing(policy.model)
        _loss(policy, ids).backward()
        gradients.append({n: p.grad.clone() for n, p in policy.model.named_parameters()})
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, atol=1e-6, rtol=1e-5, msg=name)


def test_bfloat16_updates_go_through_float32_master_weights(mini):
    from dare_gym.core.precision import MasterWeightAdamW

    folder, _, config = mini
    policy = dare_gym.load_policy(folder, dtype="bfloat16")
    policy.model.train()
    optimizer = MasterWeightAdamW(policy.model.parameters(), lr=1e-3)
    attention = policy.model.model.layers[1].attention.query_key_value.weight
    before = attention.detach().clone()
    ids = torch.tensor([[(5 * i + 2) % config["vocab_size"] for i in range(10)]])
    _loss(policy, ids).backward()
    optimizer.clip_and_step(1.0)
    copies = [m for m, p in zip(optimizer.masters, optimizer.parameters) if m is not p]
    assert copies and all(m.dtype == torch.float32 for m in copies)
    assert attention.dtype == torch.bfloat16 and not torch.equal(attention, before)
    router = policy.model.model.layers[1].mlp.gate.weight
    assert any(m is router for m in optimizer.masters)  # float32 already: its own master


def test_fsdp2_shards_per_decoder_layer_with_float32_routers(small, tmp_path):
    """One process (gloo): every decoder layer and every router is its own FSDP2 unit; under bf16 compute the
    router still computes from float32 parameters; the sharded forward is the plain one."""
    from torch.distributed.fsdp import FSDPModule

    from dare_gym.core.distributed import shard_fsdp

    folder, _, _ = small
    ids = torch.tensor([[20, 21, 22, 23, 24, 25, 26]])
    plain = _policy(folder).model
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for compute in (torch.float32, torch.bfloat16):
            model = _policy(folder).model
            shard_fsdp(model, compute)
            units = [type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)]
            assert units.count("FSDPLLaDA2MoeDecoderLayer") == 3 and units.count("FSDPLLaDA2MoeGate") == 2
            seen = []
            hook = model.model.layers[1].mlp.gate.register_forward_pre_hook(
                lambda module, args: seen.append((module.weight.dtype, args[0].dtype)))
            with torch.no_grad():
                logits = model(ids).logits
            hook.remove()
            assert seen == [(torch.float32, torch.float32)]
            if compute == torch.float32:
                with torch.no_grad():
                    torch.testing.assert_close(logits, plain(ids).logits, atol=1e-6, rtol=1e-5)
            model.train()
            model(ids).logits.float().mean().backward()
            assert all(p.grad is not None for p in model.parameters())
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_fsdp_training_runs(small, tmp_path):
    """`dare-gym train --nproc 2 strategy=fsdp` on the MoE stand-in: ranks route different tokens to different
    experts, yet reduce the same gradients (every expert runs under autograd), so two EBPO steps complete.
    FSDP needs fixed sampler schedules: the static rule and no early exit."""
    import os
    import subprocess
    import sys

    folder, _, _ = small
    fixed = "options: {remasking_strategy: low_confidence_static, early_exit: false}"
    done = subprocess.run(
        [sys.executable, "-m", "dare_gym", "train", "--nproc", "2", "strategy=fsdp", f"policy={folder}",
         "env=digitsort-v0", "algorithm.name=ebpo", "algorithm.mc_num=2", "max_steps=2",
         "time_limit_minutes=null", "prompts_per_step=2", "group_size=4", "eval_size=2", "eval_every=2",
         "progress=false", f"output_dir={tmp_path / 'run'}", f"rollout={{temperature: 1.0, gen_length: 8, {fixed}}}",
         f"evaluation={{gen_length: 8, {fixed}}}"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 processes (fsdp)" in done.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["processes"] == 2


# ------------------------------------------------------------------------------------------ memory on paper


def _memory_script():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "llada2_memory.py"
    spec = importlib.util.spec_from_file_location("llada2_memory", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_memory_counts_from_the_config_equal_the_shrunk_model_on_cpu(families_dir):
    """experiments/llada2_memory.py counts parameters, gradient, AdamW and saved-activation bytes from config.json
    alone; on the shrunk stand-in they equal what runs (bf16 and float32, with and without checkpointing)."""
    memory = _memory_script()
    rows = memory.check(families_dir / MINI / "config.json",
                        combinations=((torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, False)))
    for row in rows:
        for key, value in row.items():
            if isinstance(value, tuple):
                assert value[0] == value[1], (row["dtype"], row["checkpointing"], key, value)
    real = memory.table(json.loads((families_dir / MINI / "config.json").read_text()))
    index = json.loads((families_dir / MINI / "model.safetensors.index.json").read_text())
    # the real checkpoint's bytes: every parameter and expert-bias buffer the count finds, in bf16
    parameters = real["parameters"]
    assert index["metadata"]["total_size"] == 2 * (parameters["total"] + parameters["expert_bias_buffers"])
    assert parameters["tensors"] + 19 == len(index["weight_map"])  # every parameter tensor, and 19 expert biases
    assert 1.40e9 < real["parameters"]["active"] < 1.45e9  # the model card's "1.4B activated"
    assert sum(real["lora_one_card"].values()) < 80e9 and sum(real["fsdp_per_card"].values()) < 80e9


# ------------------------------------------------------------------------------------------ the command line

VARIED_REWARD = '''
import random


def varied(completion, sample):
    """Rewards that differ within a group: the random stand-in's tokens lie outside its tokenizer's small
    vocabulary, so its completions decode to nothing (the update, not the reward, is under test)."""
    return random.SystemRandom().random()
'''

CLI_RECIPES = {  # (overrides, dtype): bf16 on a CPU is slow, so one of them; fewer Monte-Carlo samples and
    # CJ-GRPO at μ = 2 instead of its 12, for time
    "ebpo": (["algorithm.name=ebpo", "algorithm.mc_num=2"], "bfloat16"),
    "bgpo": (["algorithm.name=bgpo", "algorithm.estimator_kwargs={mc_num: 2}"], "float32"),
    "cj_grpo": (["algorithm.name=cj_grpo", "algorithm.num_iterations=2"], "float32"),
}


@pytest.mark.parametrize("algorithm", sorted(CLI_RECIPES))
def test_dare_gym_train_on_the_shrunk_mini(mini, tmp_path, algorithm):
    """`dare-gym train policy=<LLaDA2.0-mini stand-in> algorithm.name=...`: one step of EBPO, BGPO or CJ-GRPO with
    block_diffusion rollouts through the chat template; the saved policy moved, the expert bias not."""
    import subprocess
    import sys

    folder, _, _ = mini
    (tmp_path / "varied.py").write_text(VARIED_REWARD)
    done = subprocess.run(
        [sys.executable, "-m", "dare_gym", "train", f"policy={folder}", "env=digitsort-v0",
         f"dtype={CLI_RECIPES[algorithm][1]}", *CLI_RECIPES[algorithm][0],
         f"env_kwargs.reward={tmp_path / 'varied.py'}:varied", "max_steps=1",
         "time_limit_minutes=null", "prompts_per_step=2", "group_size=4", "eval_size=2", "progress=false",
         "learning_rate=1e-3", f"output_dir={tmp_path / 'run'}", "rollout={temperature: 1.0, gen_length: 8}",
         "evaluation={gen_length: 8}"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"training {algorithm} on digitsort-v0" in done.stdout
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = next(m for m in metrics if "loss" in m)
    assert math.isfinite(step["loss"]) and step["reward_std"] > 0
    saved = tmp_path / "run" / "final_policy"
    assert json.loads((saved / "dare_gym_policy.json").read_text())["family"] == "llada2"
    before, after = load_file(str(folder / "model.safetensors")), load_file(str(saved / "model.safetensors"))
    assert set(before) == set(after)
    moved = [name for name in before if not torch.equal(before[name].float(), after[name].float())]
    assert any("attention" in name for name in moved) and "model.layers.1.mlp.gate.expert_bias" not in moved


def test_dare_gym_eval_on_the_shrunk_mini(mini, tmp_path):
    import subprocess
    import sys

    folder, _, _ = mini
    done = subprocess.run([sys.executable, "-m", "dare_gym", "eval", "--policy", str(folder), "--env",
                           "digitsort-v0", "--split", "test", "--limit", "3", "--gen", "gen_length=8"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "digitsort-v0" in done.stdout


# ------------------------------------------------------------------------------------------ tiny-moe learns

LEARNING_RECIPES = {  # DARE's three LLaDA2 algorithms at CPU scale (experiments/train_tiny.py's tiny-moe)
    "ebpo": {"name": "ebpo", "mc_num": 2},
    "bgpo": {"name": "bgpo", "estimator_kwargs": {"mc_num": 8}},
    # μ = 1, group-scaled advantages (char_match rewards differ by ~0.01 within a group), the 72 denoising steps
    # replayed in 4 chunks of 18 (the trajectory estimator's shrink)
    "cj_grpo": {"name": "cj_grpo", "num_iterations": 1, "scale_rewards": "group", "estimator_kwargs": {"shrink": 18}},
}


def test_tiny_moe_is_a_trained_block_causal_mixture_of_experts():
    policy = dare_gym.load_policy("tiny-moe")
    config = policy.model.config
    assert policy.family.name == "llada2" and policy.block_size == 4 and policy.default_sampler == "block_diffusion"
    assert config.num_experts == 8 and config.num_experts_per_tok == 2 and config.n_group == 2
    assert 1_000_000 < sum(p.numel() for p in policy.model.parameters()) < 2_000_000
    env = dare_gym.make("groupsort-v0", split="test")
    records = [env.record(i) for i in range(16)]
    completions = policy.generate([env.prompt(r) for r in records])
    char_match = [sum(a == b for a, b in zip(c.text.strip(), r["gold"])) / len(r["gold"])
                  for c, r in zip(completions, records)]
    assert sum(char_match) / len(char_match) > 0.95, char_match


@pytest.mark.parametrize("algorithm", sorted(LEARNING_RECIPES))
def test_dare_algorithms_learn_on_tiny_moe(algorithm, tmp_path):
    """Six steps of 4 prompts × 4 completions from tiny-moe's SFT checkpoint raise held-out greedy reward and
    exact accuracy on groupsort (seeds 0-2 and all three in BENCHMARKS.md)."""
    from pathlib import Path

    from dare_gym.train.trainer import GenerationConfig, TrainConfig, Trainer

    config = TrainConfig(
        policy="tiny-moe", env="groupsort-v0", algorithm=LEARNING_RECIPES[algorithm], prompts_per_step=4,
        group_size=4, max_steps=6, time_limit_minutes=None, learning_rate=1e-4, eval_size=64, eval_every=6,
        save_every=1000, rollout=GenerationConfig(temperature=1.0), evaluation=GenerationConfig(temperature=0.0),
        output_dir=str(tmp_path), progress=False, seed=2,
    )
    summary = Trainer(config).train()
    history = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    evaluations = [r for r in history if "heldout_reward" in r]
    before, after = evaluations[0], evaluations[-1]
    assert after["heldout_reward"] > before["heldout_reward"] + 0.002, (before, after)
    assert after["heldout_accuracy"] >= before["heldout_accuracy"] + 4 / 64, (before, after)


def test_dare_gym_serve_answers_with_the_policys_own_completion():
    import openai

    from dare_gym.tools.serve import ServerThread

    policy = dare_gym.load_policy("tiny-moe")
    env = dare_gym.make("groupsort-v0", split="test")
    prompt = env.prompt(env.record(0))
    expected = policy.generate([prompt])[0].text
    with ServerThread(policy, model_name="tiny-moe") as running:
        client = openai.OpenAI(base_url=running.base_url, api_key="-", max_retries=0, timeout=120)
        response = client.completions.create(model="tiny-moe", prompt=prompt)
    assert response.choices[0].text == expected and len(expected.strip()) == env.answer_chars
