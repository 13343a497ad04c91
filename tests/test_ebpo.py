"""EBPO (ALGORITHMS.md section P): the worked example through the real loss, the stratified block levels and
masks, the block-causal per-block terms against block-by-block decoding, the constant-memory backward against
the full graph, shared masks for π_old / π_θ / π_ref, and learning on the block-causal built-in policy (its
update on every family is in test_families.py with the other algorithms')."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import dare_gym
from dare_gym.core.advantages import group_advantages
from dare_gym.algorithms import build_config, list_algorithms, make_algorithm
from dare_gym.algorithms.ebpo import (
    MASKED,
    WEIGHT,
    block_elbo_noise,
    block_elbo_row,
    block_mask_counts,
    ebpo_loss,
    noised_logp,
    response_blocks,
    scoring_mask,
    sequence_kl,
    stratified_block_levels,
)
from dare_gym.core.buffer import RolloutBuffer
from dare_gym.tools.compare import plan_comparison
from dare_gym.models.standin import build_standin
from dare_gym.train.trainer import GenerationConfig, TrainConfig, Trainer
from test_block_training import tiny_block_policy  # the block-causal (or, with None, bidirectional) random tiny model

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "compare_default.yaml"


# --------------------------------------------------------------------------- the worked example (P)

# Two sequences of L = 4 in two grid-aligned blocks of 2, N = 2 rows: [sequence, row, token].
EXAMPLE_MASKED = torch.tensor([[[0, 1, 1, 1], [1, 1, 0, 1]],
                               [[1, 1, 1, 1], [1, 0, 1, 0]]], dtype=torch.bool)
EXAMPLE_WEIGHT = torch.tensor([[[0, 2, 1, 1], [1, 1, 0, 2]],
                               [[1, 1, 1, 1], [2, 0, 2, 0]]], dtype=torch.float32)
EXAMPLE_LOGP = torch.tensor([[[0, -0.4, -1.0, -0.6], [-0.9, -0.7, 0, -0.2]],
                             [[-1.2, -0.8, -1.5, -0.5], [-1.0, 0, -1.3, 0]]])
EXAMPLE_OLD = torch.tensor([[[0, -0.5, -1.1, -0.6], [-1.0, -0.8, 0, -0.3]],
                            [[-1.1, -0.8, -1.5, -0.5], [-0.95, 0, -1.3, 0]]])


def composite(logp: torch.Tensor) -> torch.Tensor:
    """[sequences] 𝓑 = mean over rows of block_elbo_row, on the example's masks and weights."""
    rows = [block_elbo_row(logp[:, n], EXAMPLE_MASKED[:, n], EXAMPLE_WEIGHT[:, n]) for n in range(logp.shape[1])]
    return torch.stack(rows, dim=1).mean(dim=1)


def test_the_worked_example_loss_gradient_and_kl():
    logp = EXAMPLE_LOGP.clone().requires_grad_(True)
    elbo, old = composite(logp), composite(EXAMPLE_OLD)
    torch.testing.assert_close(elbo.detach(), torch.tensor([-2.2, -4.3]))
    torch.testing.assert_close(old, torch.tensor([-2.55, -4.2]))
    advantages = group_advantages(torch.tensor([1.0, 0.0]), 2, std_eps=1e-6)  # verl's z-score
    torch.testing.assert_close(advantages, torch.tensor([0.707106, -0.707106]), atol=1e-6, rtol=0)

    loss, metrics = ebpo_loss(elbo, old, advantages, epsilon_low=0.2)
    assert loss.item() == pytest.approx(-0.104356, abs=1e-6)
    assert metrics["clip_fraction"].item() == 0.5  # sequence 1 (A > 0, ρ = 1.419 > 1.2) is clipped
    (grad_elbo,) = torch.autograd.grad(loss, elbo, retain_graph=True)
    torch.testing.assert_close(grad_elbo, torch.tensor([0.0, 0.319908]), atol=1e-6, rtol=0)
    loss.backward()
    # each masked token of sequence 2 gets 0.159954 × its weight; sequence 1 nothing
    expected = 0.159954 * EXAMPLE_WEIGHT * EXAMPLE_MASKED
    expected[0] = 0
    torch.testing.assert_close(logp.grad, expected, atol=1e-6, rtol=0)

    ref = torch.tensor([-2.3, -4.25])
    torch.testing.assert_close(sequence_kl(elbo.detach(), ref, "k3"), torch.tensor([0.004837, 0.001271]),
                               atol=1e-6, rtol=0)
    total, metrics = ebpo_loss(elbo.detach(), old, advantages, epsilon_low=0.2, ref_elbo=ref, beta=0.01)
    assert total.item() == pytest.approx(-0.104325, abs=1e-6)
    assert metrics["kl_ref"].item() == pytest.approx(0.003054, abs=1e-6)
    torch.testing.assert_close(sequence_kl(torch.tensor([0.3]), torch.tensor([0.1]), "k1"), torch.tensor([0.2]))
    torch.testing.assert_close(sequence_kl(torch.tensor([0.3]), torch.tensor([0.1]), "k2"), torch.tensor([0.02]))


def test_the_log_domain_clip_keeps_a_huge_ratio_finite():
    """A > 0 with log ρ = 1000: the clipped side is never exponentiated, so the loss is −1.2·A, gradient 0;
    A < 0 below 1 − ε: clipped at 0.8, gradient 0."""
    elbo = torch.tensor([1000.0, -5.0], requires_grad=True)
    loss, _ = ebpo_loss(elbo, torch.zeros(2), torch.tensor([1.0, -1.0]), epsilon_low=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    loss.backward()
    assert elbo.grad.tolist() == [0.0, 0.0]


def test_rows_without_a_valid_token_are_left_out_of_the_mean():
    loss, _ = ebpo_loss(torch.zeros(3), torch.zeros(3), torch.tensor([1.0, -1.0, 5.0]),
                        torch.tensor([True, True, False]), epsilon_low=0.2)
    assert loss.item() == pytest.approx(0.0)
    loss, _ = ebpo_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, 5.0]), torch.tensor([True, False]),
                        epsilon_low=0.2)
    assert loss.item() == pytest.approx(-1.0)


# ------------------------------------------------------------------------------- levels and masks


def test_the_worked_example_levels_counts_and_weights():
    levels = stratified_block_levels(torch.tensor([0.3, 0.7]), 2, torch.tensor([2, 2]))
    torch.testing.assert_close(levels, torch.tensor([[[0.3, 0.55], [0.8, 0.05]], [[0.7, 0.95], [0.2, 0.45]]],
                                                    dtype=torch.float64))
    counts = block_mask_counts(levels, torch.tensor(2))
    assert counts.tolist() == [[[1, 2], [2, 1]], [[2, 2], [1, 1]]]

    blocks = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    noise = block_elbo_noise(blocks, 2, torch.Generator().manual_seed(0), u=torch.tensor([0.3, 0.7]))
    per_block = noise["masked"].view(2, 2, 2, 2).sum(dim=3)  # [sequence, row, block]
    assert per_block.tolist() == counts.tolist()
    weights = noise["weight"].view(2, 2, 2, 2).amax(dim=3)
    assert weights.tolist() == [[[2, 1], [1, 2]], [[1, 1], [2, 2]]]
    assert torch.equal(noise["weight"] > 0, noise["masked"])


def left_padded_inputs(prompt_lengths, response_lengths, width: int, *, vocab: int, eos: int, seed: int = 0):
    """A RolloutBuffer with prompts of the given real lengths and completions of ``width`` columns whose first
    EOS ends the valid response (EOS padding after it)."""
    generator = torch.Generator().manual_seed(seed)
    rows = len(prompt_lengths)
    prompt_width = max(prompt_lengths)
    prompt_ids = torch.zeros(rows, prompt_width, dtype=torch.long)  # left-padded, as samplers lay them out
    prompt_mask = torch.zeros(rows, prompt_width, dtype=torch.long)
    completion_ids = torch.full((rows, width), eos, dtype=torch.long)
    completion_mask = torch.zeros(rows, width, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
        prompt_ids[i, prompt_width - p:] = torch.randint(5, vocab, (p,), generator=generator)
        prompt_mask[i, prompt_width - p:] = 1
        completion_ids[i, : r - 1] = torch.randint(5, vocab, (r - 1,), generator=generator)
        completion_mask[i, :r] = 1  # up to and including the first EOS
    return RolloutBuffer(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, unmask_step=torch.zeros(rows, width, dtype=torch.long),
        reward=torch.rand(rows, generator=generator), group_id=torch.arange(rows) // 2,
        prompts=[f"p{i}" for i in range(rows)], completions=[f"c{i}" for i in range(rows)], pad_token_id=0,
    )


PROMPTS, RESPONSES = (3, 7, 5, 2), (9, 4, 11, 6)  # partial first and last blocks with blocks of 4


def test_blocks_lie_on_the_packed_grid_and_each_masks_exactly_m_of_its_valid_tokens():
    buffer = left_padded_inputs(PROMPTS, RESPONSES, 12, vocab=50, eos=2)
    inputs = buffer.model_inputs()
    blocks = response_blocks(scoring_mask(inputs), inputs.completion_mask, 4)
    # prompt of 3: block 0 holds one response token, then full blocks of 4, the last partial
    assert blocks[0].tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2, -1, -1, -1]
    assert blocks[1].tolist() == [0, 1, 1, 1] + [-1] * 8  # prompt of 7: one token, then 3
    assert blocks[3].tolist() == [0, 0, 1, 1, 1, 1] + [-1] * 6
    assert response_blocks(scoring_mask(inputs), inputs.completion_mask, None)[2].tolist() == [0] * 11 + [-1]

    rows, seen = 3, {}
    generator = torch.Generator().manual_seed(1)
    for _ in range(400):
        noise = block_elbo_noise(blocks, rows, generator)
        masked, weight = noise["masked"], noise["weight"]
        assert not (masked & (blocks < 0)[:, None]).any()  # never past the valid response (nor the prompt)
        for b in range(len(PROMPTS)):
            for j in range(int(blocks[b].max()) + 1):
                in_block = blocks[b] == j
                size = int(in_block.sum())
                counts = masked[b][:, in_block].sum(dim=1)
                assert ((counts >= 1) & (counts <= size)).all()
                for n in range(rows):
                    assert torch.all(weight[b, n][masked[b, n] & in_block] == size / counts[n])
                    seen.setdefault((b, j), []).append(int(counts[n]))
    # m ~ U{1..len}: every count of a 4-token block turns up about equally often
    for (b, j), counts in seen.items():
        size = int((blocks[b] == j).sum())
        frequencies = torch.bincount(torch.tensor(counts), minlength=size + 1)[1:].float() / len(counts)
        assert torch.all((frequencies - 1 / size).abs() < 0.06), (b, j, frequencies)


# ------------------------------------------------------------------------------------ policies


@pytest.fixture(params=["tiny_block", "sdar"])
def block_policy(request, tmp_path):
    if request.param == "tiny_block":
        return tiny_block_policy(4)
    policy = dare_gym.load_policy(build_standin("sdar", tmp_path / "sdar"))
    policy.model.eval()
    return policy


def test_each_block_term_is_block_by_block_decoding_of_that_block(block_policy):
    """The scoring forward's log-prob at every response position equals a plain block-causal forward of
    [the clean packed sequence before the position's block ; that block as noised], for every block of every
    row of a left-padded batch with partial first and last blocks."""
    policy, size = block_policy, block_policy.block_size
    vocab = min(policy.model.config.vocab_size, 90)
    buffer = left_padded_inputs(PROMPTS, RESPONSES, 12, vocab=vocab, eos=policy.tokenizer.eos_token_id)
    inputs = buffer.model_inputs()
    masked = torch.rand(inputs.completion_ids.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    masked &= inputs.completion_mask.bool()
    with torch.no_grad():
        scored = noised_logp(policy, inputs, masked)
    blocks = response_blocks(scoring_mask(inputs), inputs.completion_mask, size)
    checked = 0
    for b, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        prompt = buffer.prompt_ids[b, buffer.prompt_mask[b].bool()].tolist()
        clean = prompt + inputs.completion_ids[b, :r].tolist()
        noisy = prompt + inputs.completion_ids[b, :r].masked_fill(masked[b, :r], policy.mask_token_id).tolist()
        for start in range(0, p + r, size):
            end = min(start + size, p + r)
            if end <= p:
                continue  # a block of prompt only: nothing to score
            ids = torch.tensor([clean[:start] + noisy[start:end]])
            with torch.no_grad():
                logits = policy.family.forward(policy.model, ids, torch.ones_like(ids), block_size=size)
            logp = torch.log_softmax(logits.float(), dim=-1)
            for position in range(max(start, p), end):
                k = position - p  # its completion column
                expected = logp[0, position, clean[position]]
                torch.testing.assert_close(scored[b, k], expected, atol=5e-5, rtol=1e-4)
                assert int(blocks[b, k]) == (position // size) - (p // size)
                checked += 1
    assert checked == sum(RESPONSES)


def test_full_attention_scores_the_whole_completion_as_one_block():
    policy = tiny_block_policy(None)
    buffer = left_padded_inputs(PROMPTS, RESPONSES, 12, vocab=50, eos=policy.tokenizer.eos_token_id)
    inputs = buffer.model_inputs()
    masked = inputs.completion_mask.bool() & (torch.arange(12) % 3 == 0)
    noisy = torch.cat([inputs.prompt_ids, inputs.completion_ids.masked_fill(masked, policy.mask_token_id)], dim=1)
    with torch.no_grad():
        scored = noised_logp(policy, inputs, masked)
        logits = policy.logits(noisy, scoring_mask(inputs))[:, inputs.prompt_length:]
    expected = torch.log_softmax(logits, dim=-1).gather(2, inputs.completion_ids[..., None]).squeeze(2)
    valid = inputs.completion_mask.bool()
    torch.testing.assert_close(scored[valid], expected[valid], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- the update


def ebpo(**options):
    config = build_config("ebpo", {"mc_num": 3, **options})
    return make_algorithm("ebpo", config, mask_token_id=3)


def prepared(policy, method, *, reference=None, seed=0):
    buffer = left_padded_inputs(PROMPTS, RESPONSES, 12, vocab=50, eos=policy.tokenizer.eos_token_id, seed=seed)
    buffer = method.advantages(buffer, 2)
    method.prepare(policy, reference, buffer, torch.Generator().manual_seed(seed), micro_batch_size=3)
    return buffer


def test_one_set_of_masks_serves_old_current_and_reference():
    """Masks are drawn once in prepare: π_old (μ > 1) and π_ref (β > 0) are scored on them, and the first
    iteration's π_θ on the same ones, so identical weights give log ρ = 0 and KL = 0 exactly."""
    policy = tiny_block_policy(4)
    reference = copy.copy(policy)
    reference.model = copy.deepcopy(policy.model)
    method = ebpo(num_iterations=2, beta=0.05)
    assert method.needs_reference
    buffer = prepared(policy, method, reference=reference)
    assert buffer.columns[MASKED].shape == (4, 3, 12) and buffer.columns[WEIGHT].shape == (4, 3, 12)
    torch.testing.assert_close(buffer.columns["old_elbo"], buffer.columns["ref_elbo"])
    assert (buffer.columns["old_elbo"] < 0).all()
    masks = buffer.columns[MASKED].clone()
    for iteration in range(2):
        _, metrics = method.backward(policy, buffer, iteration, 1.0)
        assert metrics["elbo_drift"] == 0.0 and metrics["kl_ref"] == 0.0
    assert torch.equal(buffer.columns[MASKED], masks)


@pytest.mark.parametrize("block_size", [None, 4])
def test_constant_memory_backward_equals_the_full_graph_gradient(block_size):
    """backward (a graph-free pass, then one graph per noise row) gives the parameter gradient of the loss
    built with every row's graph at once; with π_old shifted so that some sequences clip and β > 0. In float64:
    the two ways sum the same terms in another order, which in float32 differs by more than a fixed tolerance
    under some thread counts and loads; in float64 that rounding is 1e-16 relative, far below any real error."""
    policy = tiny_block_policy(block_size, seed=1)
    policy.model.double()
    reference = copy.copy(policy)
    reference.model = copy.deepcopy(policy.model)
    torch.nn.init.normal_(reference.model.get_input_embeddings().weight, std=0.5)
    method = ebpo(num_iterations=2, beta=0.1, kl_estimator="k2")
    buffer = prepared(policy, method, reference=reference, seed=2)
    buffer.columns["old_elbo"] = buffer.columns["old_elbo"] + torch.tensor([0.5, -0.5, 0.0, 0.3])

    policy.model.zero_grad()
    loss, metrics = method.loss(policy, buffer, 0)
    (0.7 * loss).backward()
    full = {name: p.grad.clone() for name, p in policy.model.named_parameters()}
    assert 0 < metrics["clip_fraction"] < 1

    policy.model.zero_grad()
    value, _ = method.backward(policy, buffer, 0, 0.7)
    assert value == pytest.approx(loss.item(), abs=1e-12)
    for name, p in policy.model.named_parameters():
        assert p.grad.dtype == torch.float64
        torch.testing.assert_close(p.grad, full[name], atol=1e-12, rtol=1e-9, msg=name)
    assert any(g.abs().sum() > 0 for g in full.values())


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="algorithm.estimator: ebpo has no such field"):
        build_config("ebpo", {"estimator": "elbo"})  # its all-block ELBO is its own
    with pytest.raises(ValueError, match="mc_num.*0"):
        build_config("ebpo", {"mc_num": 0})
    with pytest.raises(ValueError, match="epsilon must be < 1"):
        build_config("ebpo", {"epsilon": 1.0})
    with pytest.raises(ValueError, match="algorithm.dual_clip: ebpo has no such field"):
        build_config("ebpo", {"dual_clip": 3.0})


def test_registered_and_planned_by_compare():
    assert "ebpo" in list_algorithms()
    plan = plan_comparison(["ebpo"], [0], 256, config_path=CONFIG)
    assert not plan.config_errors, plan.config_errors
    settings = plan.run_config("ebpo", seed=0, output_dir="unused")
    assert settings["algorithm"]["name"] == "ebpo"


# ------------------------------------------------------------------------------------- learning


def test_ebpo_learns_on_the_block_causal_builtin_policy(tmp_path):
    """tiny-block (blocks of 4, block-diffusion rollouts) on groupsort: a few EBPO steps raise held-out greedy
    reward and exact accuracy."""
    config = TrainConfig(
        policy="tiny-block", env="groupsort-v0", algorithm={"name": "ebpo", "mc_num": 2},
        prompts_per_step=4, group_size=4, max_steps=3, time_limit_minutes=None, learning_rate=1e-4,
        eval_size=32, eval_every=3, save_every=1000, rollout=GenerationConfig(temperature=1.0),
        evaluation=GenerationConfig(temperature=0.0), output_dir=str(tmp_path), progress=False, seed=0,
    )
    summary = Trainer(config).train()
    history = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    evaluations = [r for r in history if "heldout_reward" in r]
    before, after = evaluations[0], evaluations[-1]
    assert after["heldout_reward"] >= before["heldout_reward"] + 0.004, (before, after)
    assert after["heldout_accuracy"] > before["heldout_accuracy"], (before, after)
