"""d-TreeRPO (ALGORITHMS.md section Q): the tree rollout, values and advantages, the loss's worked example, and a
training step on the tiny policy (plain and LoRA). Its learning run is in test_algorithms_learn.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dare_gym.algorithms import build_config, make_algorithm
from dare_gym.algorithms.dtreerpo import (
    dtreerpo_loss,
    self_distillation_loss,
    self_distillation_schedule,
    sibling_advantages,
    tree_values,
)
from dare_gym.core.config import ConfigError
from dare_gym.core.lora import LoraSettings
from dare_gym.samplers.llada import continue_denoising, denoise_blocks
from dare_gym.algorithms.dtreerpo.rollout import NOT_YET, branch_points, grow_trees
from dare_gym.train.trainer import GenerationConfig, TrainConfig, Trainer, resolve


def _algorithm(policy, **options):
    return make_algorithm("dtreerpo", build_config("dtreerpo", options), mask_token_id=policy.mask_token_id)


# ------------------------------------------------------------------------------------------ the worked example

# Segments in the buffer's level-major order: a, b (root's children), a1, a2 (a's), b1, b2 (b's); L = 4.
ACTIVE = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 0], [0, 0, 1, 1], [0, 0, 1, 1]]).bool()
GROUP = torch.tensor([0, 0, 1, 1, 2, 2])  # the parent: root, a, b
ADVANTAGE = torch.tensor([-0.5, 0.5, 1.0, -1.0, 0.0, 0.0])


def _per_token(pairs):
    out = torch.zeros(ACTIVE.shape)
    out[ACTIVE] = torch.tensor([v for pair in pairs for v in pair])
    return out


NEW = _per_token([(-0.5, -1.0), (-1.2, -0.3), (-0.2, -0.8), (-0.1,), (-0.3, -0.6), (-0.9, -0.4)])
OLD = _per_token([(-0.6, -1.0), (-1.0, -0.3), (-0.6, -0.7), (-0.1,), (-0.3, -0.5), (-1.0, -0.4)])
REF = _per_token([(-0.7, -0.9), (-1.2, -0.5), (-0.3, -0.8), (-0.2,), (-0.3, -0.6), (-0.8, -0.4)])
TOKENS = torch.tensor([[5, 6, 3, 3], [7, 8, 3, 3], [5, 6, 9, 10], [5, 6, 2, 2], [7, 8, 11, 12], [7, 8, 13, 14]])


def _example_loss(**kwargs):
    options = dict(epsilon=0.4, beta=0.01, sd_weight=0.0, sd_tau=1.0) | kwargs
    return dtreerpo_loss(NEW, OLD, REF, ADVANTAGE, ACTIVE, TOKENS, GROUP, **options)


def test_worked_example_policy_kl_and_totals():
    loss, parts = _example_loss()
    assert parts["policy_loss"] == pytest.approx(-0.013468, abs=5e-7)
    assert parts["kl_ref"] == pytest.approx(0.005193, abs=5e-7)
    assert float(loss) == pytest.approx(-0.013416, abs=5e-7)  # without SD (off, or at progress 0)
    weight, tau = self_distillation_schedule(0.0, lambda_max=3e-3, gamma=2.0, tau_max=2.0, tau_exponent=0.7)
    assert (weight, tau) == (0.0, 2.0)


def test_worked_example_with_self_distillation_at_progress_one_half():
    weight, tau = self_distillation_schedule(0.5, lambda_max=3e-3, gamma=2.0, tau_max=2.0, tau_exponent=0.7)
    assert weight == pytest.approx(8.06824e-4, rel=1e-5) and tau == pytest.approx(1.231144, rel=1e-6)
    loss, parts = _example_loss(sd_weight=weight, sd_tau=tau)
    # q is one-hot (one positive sibling per group): the terms are −ℓ of b's and a1's tokens, group b has none
    assert parts["sd_terms"] == 4 and parts["sd_loss"] == pytest.approx(0.625, abs=1e-6)
    assert float(loss) == pytest.approx(-0.012912, abs=5e-7)
    assert self_distillation_schedule(2.0, lambda_max=3e-3, gamma=2.0, tau_max=2.0, tau_exponent=0.7) == (3e-3, 1e-6)


def test_self_distillation_is_the_kl_from_the_weighted_token_histogram():
    """Three positive siblings, two of which agree on a token, and one negative: KL(q ‖ π(·|x_p)) by hand."""
    parent = torch.log_softmax(torch.tensor([[0.3, -1.0, 2.0, 0.5], [1.0, 0.0, -0.5, 0.2]]), dim=-1)  # [L=2, V=4]
    tokens = torch.tensor([[2, 0], [2, 1], [3, 1], [0, 0]])
    logp = parent.gather(-1, tokens.T).T  # each sibling's ℓ: the shared parent's log-prob of its token
    advantages = torch.tensor([1.0, 0.5, 0.2, -1.7])
    active = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    group = torch.zeros(4, dtype=torch.long)
    tau = 0.8
    sd, terms = self_distillation_loss(logp, tokens, advantages, active, group, tau)
    w = torch.softmax(advantages[:3] / tau, dim=0)
    expected = []
    for j in range(2):
        q = torch.zeros(4)
        for k in range(3):
            if active[k, j]:
                q[tokens[k, j]] += w[k]
        q = q / (q.sum() + 1e-8)
        support = q > 0
        expected.append(float((q[support] * (torch.log(q[support] + 1e-8) - parent[j, support])).sum()))
    assert terms == 2 and float(sd) == pytest.approx(sum(expected) / 2, rel=1e-5)
    # a lone row, or a group without a positive advantage, adds nothing
    assert self_distillation_loss(logp[:1], tokens[:1], advantages[:1], active[:1], group[:1], tau)[1] == 0
    assert self_distillation_loss(logp, tokens, -advantages.abs(), active, group, tau)[1] == 0


def test_values_and_sibling_advantages_of_the_example_tree():
    node = torch.tensor([1, 2, 3, 4, 5, 6])  # root is node 0 (no row)
    parent = torch.tensor([0, 0, 1, 1, 2, 2])
    depth = torch.tensor([1, 1, 2, 2, 2, 2])
    reward = torch.tensor([math.nan, math.nan, 1.0, 0.0, 1.0, 1.0])
    values, roots = tree_values(node, parent, depth, reward)
    assert values.tolist() == [0.5, 1.0, 1.0, 0.0, 1.0, 1.0] and roots.tolist() == [0.75]
    assert sibling_advantages(values, parent).tolist() == [-0.5, 0.5, 1.0, -1.0, 0.0, 0.0]
    # NaN-aware: an unknown leaf is left out of its parent's mean and of its siblings' baselines, and gets A = 0;
    # an only child's advantage is its value
    values, _ = tree_values(node, parent, depth, torch.tensor([math.nan, math.nan, 1.0, math.nan, 0.0, 1.0]))
    assert values.tolist()[:2] == [1.0, 0.5]
    advantages = sibling_advantages(values, parent)
    assert advantages.tolist() == [0.5, -0.5, 1.0, 0.0, -1.0, 1.0]
    only_children = torch.tensor([0.25, 0.5], dtype=torch.float64)
    assert sibling_advantages(only_children, torch.tensor([0, 1])).tolist() == [0.25, 0.5]


# ---------------------------------------------------------------------------------------------- the tree


def test_branch_points():
    assert branch_points(128, 2) == [128, 64, 0]
    assert branch_points(4, 2) == [4, 2, 0]
    assert branch_points(5, 2) == [5, 3, 0]
    assert branch_points(8, 1) == [8, 0]
    with pytest.raises(ValueError, match="tree_contraction_factor.*1..steps=4, got 5"):
        branch_points(4, 5)


def test_continue_denoising_in_two_pieces_is_the_llada_sampler(tiny_policy):
    """From all-masked rows, steps [0, k) then [k, T) draw the same noise and commit the same tokens at the same
    steps as one run of the LLaDA sampler, whether k falls on a block boundary or inside a block."""
    prompt_ids, prompt_mask = tiny_policy.encode_prompts(["sort 583920\n", "sort 71\n", "sort 4096\n"])
    settings = dict(gen_length=8, steps=8, block_length=4, temperature=1.0, remasking="low_confidence")
    reference = denoise_blocks(tiny_policy, prompt_ids, prompt_mask, generator=torch.Generator().manual_seed(3),
                               record_predictions=False, **settings)
    for split in (4, 3):
        generator = torch.Generator().manual_seed(3)
        x = torch.cat([prompt_ids, torch.full((3, 8), tiny_policy.mask_token_id)], dim=1)
        attention = torch.cat([prompt_mask, torch.ones(3, 8, dtype=torch.long)], dim=1)
        steps, logp = torch.full((3, 8), -1), torch.zeros(3, 8)
        for first, last in ((0, split), (split, 8)):
            continue_denoising(tiny_policy, x, attention, prompt_ids.shape[1], steps, logp, first_step=first,
                               last_step=last, steps=8, block_length=4, temperature=1.0,
                               remasking="low_confidence", generator=generator)
        assert torch.equal(x[:, prompt_ids.shape[1]:], reference.completion_ids)
        assert torch.equal(steps, reference.unmask_step)


def test_tree_shape_and_children_continue_from_their_parent(tiny_policy):
    """4 × 4 trees: 16 leaves and 20 segments a prompt; every token fixed in a parent is fixed, unchanged, in
    each child; level 1 ran steps 0..3 only; leaves are complete; siblings differ (independent continuations)."""
    prompt_ids, prompt_mask = tiny_policy.encode_prompts(["sort 583920\n", "sort 4096\n"])
    tree = grow_trees(tiny_policy, prompt_ids, prompt_mask, fan_out=[4, 4], steps=8, gen_length=8, block_length=8,
                      temperature=1.0, generator=torch.Generator().manual_seed(0), batch_size=7)
    mask = tiny_policy.mask_token_id
    assert len(tree.leaves()) == 32 and int((tree.parent >= 0).sum()) == 40
    assert tree.tree[tree.leaves()].tolist() == [0] * 16 + [1] * 16  # prompt-major: a group's leaves
    assert tree.depth.tolist() == [0] * 2 + [1] * 8 + [2] * 32 and tree.step.unique().tolist() == [0, 4, 8]
    for node in range(len(tree.tree)):
        state, steps = tree.completion_ids[node], tree.unmask_step[node]
        assert torch.equal(state == mask, steps == NOT_YET)
        assert int((state != mask).sum()) == {0: 0, 1: 4, 2: 8}[int(tree.depth[node])]  # 1 token per step
        assert int(steps.max()) < 8 - int(tree.step[node])
        parent = int(tree.parent[node])
        if parent >= 0:
            fixed = tree.completion_ids[parent] != mask
            assert tree.tree[node] == tree.tree[parent]
            assert torch.equal(state[fixed], tree.completion_ids[parent][fixed])
            assert torch.equal(steps[fixed], tree.unmask_step[parent][fixed])
            own = ~fixed & (state != mask)  # committed in the child's own level
            assert own.any() and (steps[own] >= 8 - int(tree.step[parent])).all()
    leaves = tree.completion_ids[tree.leaves()]
    assert not (leaves == mask).any()
    assert len({tuple(row.tolist()) for row in leaves[:16]}) > 1


def test_segments_of_prompts_of_different_lengths_keep_the_samplers_prompt_layout(tiny_policy):
    """Real datasets have prompts of different token lengths: each segment row carries its tree's prompt
    left-padded exactly as the sampler saw it (the buffer refuses any other layout)."""
    algorithm = _algorithm(tiny_policy, tree_branch_factor=2)
    prompts = ["sort 583920\n"] * 4 + ["sort 4096\n"] * 4
    rollout = algorithm.rollout(tiny_policy, prompts, group_size=4, generator=torch.Generator().manual_seed(1),
                                batch_size=64, settings=dict(gen_length=4, steps=4, block_length=2, temperature=1.0))
    buffer = rollout.buffer([1.0, 0.0, 1.0, 1.0] * 2, [0] * 4 + [1] * 4)
    sampled_ids, sampled_mask = tiny_policy.encode_prompts(["sort 583920\n", "sort 4096\n"])
    assert int(sampled_mask[1].sum()) < int(sampled_mask[0].sum())  # the two prompts differ in length
    tree = torch.tensor([0 if prompt == prompts[0] else 1 for prompt in buffer.prompts])
    assert torch.equal(buffer.prompt_ids, sampled_ids[tree]) and torch.equal(buffer.prompt_mask, sampled_mask[tree])
    assert sorted(tree.tolist()) == [0] * 6 + [1] * 6


def test_the_worked_example_tree_from_a_rollout(tiny_policy):
    """L = 4, block 2, T = 4, s = 2, fan-out 2 × 2 on the tiny policy: root → a, b decode tokens 1–2 and their
    children tokens 3–4; with leaf rewards (1, 0, 1, 1) the buffer's advantages are the example's."""
    algorithm = _algorithm(tiny_policy, tree_branch_factor=2)
    prompts = ["sort 583920\n"] * 4
    rollout = algorithm.rollout(tiny_policy, prompts, group_size=4, generator=torch.Generator().manual_seed(1),
                                batch_size=64, settings=dict(gen_length=4, steps=4, block_length=2, temperature=1.0))
    assert len(rollout.completions) == 4 and all(c.unmask_step.max() == 3 for c in rollout.completions)
    buffer = algorithm.advantages(rollout.buffer([1.0, 0.0, 1.0, 1.0], [0] * 4), 4)
    assert len(buffer) == 6
    mask = tiny_policy.mask_token_id
    parent_masked, child_masked = buffer.columns["parent_ids"] == mask, buffer.completion_ids == mask
    segment = parent_masked & ~child_masked
    assert segment.tolist() == [[True, True, False, False]] * 2 + [[False, False, True, True]] * 4
    assert buffer.columns["depth"].tolist() == [1, 1, 2, 2, 2, 2] and buffer.group_id.tolist() == [0, 0, 1, 1, 2, 2]
    assert buffer.advantage.tolist() == [-0.5, 0.5, 1.0, -1.0, 0.0, 0.0]
    assert buffer.columns["value"].tolist() == [0.5, 1.0, 1.0, 0.0, 1.0, 1.0] and algorithm.root_value == 0.75
    assert (buffer.unmask_step[child_masked] == 4).all()  # not yet committed: still attended, scored nowhere
    # siblings (same parent) always share a minibatch, so self-distillation sees whole groups
    for minibatch in buffer.minibatches(3, generator=torch.Generator().manual_seed(0), unit=algorithm.minibatch_unit):
        for g in minibatch.group_id.unique():
            assert int((minibatch.group_id == g).sum()) == int((buffer.group_id == g).sum())


def test_tree_settings_that_do_not_fit_are_named(tiny_policy):
    algorithm = _algorithm(tiny_policy, num_tree_samples=4)  # 4 × 4 = 16 leaves
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"must equal group_size=8; got 4 × 4\^1"):
        algorithm.rollout(tiny_policy, ["sort 1\n"] * 8, group_size=8, generator=generator, batch_size=8, settings={})
    with pytest.raises(ValueError, match=r"group_size=6; got group_size / 4\^1: set group_size to a multiple of 4"):
        _algorithm(tiny_policy).rollout(tiny_policy, ["sort 1\n"] * 6, group_size=6, generator=generator,
                                        batch_size=8, settings={})
    with pytest.raises(ValueError, match="rollout.sampler must be llada or null, got 'fast_dllm'"):
        algorithm.rollout(tiny_policy, ["sort 1\n"] * 16, group_size=16, generator=generator, batch_size=8,
                          settings={"sampler": "fast_dllm"})
    with pytest.raises(ConfigError, match="tree_branch_factor must be an integer >= 1, got 0"):
        resolve(TrainConfig(algorithm={"name": "dtreerpo", "tree_branch_factor": 0}))


# ------------------------------------------------------------------------------------------ training steps


def _varied_reward(completion: str, sample) -> float:
    return (sum(map(ord, completion)) % 5) / 4  # rewards differ within a tree


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_training_step_updates_the_policy(tmp_path, lora):
    """Rollout, values, π_old / π_ref (a frozen copy, or the LoRA-disabled base) and two updates with every term
    on; the SD clock advances per optimizer step and is checkpointed."""
    config = TrainConfig(
        algorithm={"name": "dtreerpo", "num_iterations": 2, "self_distillation_horizon": 16}, prompts_per_step=2,
        group_size=8, max_steps=1, eval_size=0, output_dir=str(tmp_path), progress=False,
        env_kwargs={"reward": _varied_reward}, rollout=GenerationConfig(temperature=1.0),
        lora=LoraSettings(r=4, alpha=8) if lora else None, learning_rate=1e-3,
    )
    trainer = Trainer(config)
    assert trainer.reference is not None and (trainer.reference.model is trainer.policy.model) == lora
    before = {k: v.clone() for k, v in trainer.policy.model.state_dict().items()}
    buffer, stats = trainer.collect()
    assert len(buffer) == 2 * (2 + 8) and stats["reward_std"] > 0 and 0 <= stats["zero_variance_fraction"] <= 1
    update = trainer.update(buffer)
    assert update["rows_trained"] == 20 and math.isfinite(update["loss"]) and update["kl_ref"] >= 0
    assert update["sd_terms"] > 0 and update["sd_lambda"] > 0  # later updates are at t >= 1 of 16
    # the official schedule: 3 parent positions (the root, its 2 children) × μ = 2 optimizer steps each
    assert trainer.algorithm.state_dict() == {"optimizer_steps": 6}
    after = trainer.policy.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    restored = copy.copy(trainer.algorithm)
    restored.load_state_dict({"optimizer_steps": 7})
    assert restored.sd_schedule()[0] > trainer.algorithm.sd_schedule()[0]


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    from dare_gym.models.standin import build_standin

    root = tmp_path_factory.mktemp("standins")
    return {name: build_standin(name, root / name) for name in ("llada", "dream", "sdar")}


@pytest.mark.parametrize("family", ["llada", "dream", "sdar"])
def test_an_update_on_every_family(standins, tmp_path, family):
    """The tree rollout and the parent-state forward go through each family's forward (Dream's shifted logits,
    SDAR's block-causal mask); the LLaDA sampler is named because SDAR's default sampler is block_diffusion."""
    config = TrainConfig(
        env="digitsort-v0", policy=str(standins[family]), prompts_per_step=2, group_size=4, max_steps=1, eval_size=0,
        algorithm={"name": "dtreerpo", "num_iterations": 2, "tree_branch_factor": 2}, output_dir=str(tmp_path),
        progress=False, env_kwargs={"reward": _varied_reward},
        rollout=GenerationConfig(sampler="llada", gen_length=8, steps=8, block_length=4, temperature=1.0),
    )
    trainer = Trainer(config)
    before = {k: v.clone() for k, v in trainer.policy.model.state_dict().items()}
    buffer, stats = trainer.collect()
    assert len(buffer) == 2 * (2 + 4) and stats["reward_std"] > 0
    update = trainer.update(buffer)
    assert update["rows_trained"] == 12 and math.isfinite(update["loss"])
    after = trainer.policy.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
