"""The multi-forward estimators (coupled, elbo, elbo_pair, block, trajectory, exact_ar) against
``reference/ALGORITHMS.md``: the worked numbers, what every forward sees and scores, and, on a tiny random
model, the Monte-Carlo ELBOs against the exact ELBO computed by enumeration.

Fake models here are *scripted*: their logits are built so that the log-softmax at each clean completion
token is a value the test chooses from the mask pattern of the input, so every estimate is hand-computable.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dare_gym.core.buffer import SequenceBatch
from dare_gym.core.estimators import (
    BlockwiseMask,
    CoupledComplementary,
    PairedELBO,
    StratifiedELBO,
    TrajectoryReplay,
    make_estimator,
    shrink_steps,
    stratified_mask_counts,
)
from dare_gym.algorithms.cj_grpo import step_mean_loss
from dare_gym.algorithms.spg import reinforce_loss, spg_elbo, spg_eubo
from dare_gym.core.losses import clipped_surrogate, kl_penalty
from helpers import EOS, MASK, PAD, ScriptedPolicy, make_batch



# ------------------------------------------------------------------------------------------ fixtures


def by_mask_count(table: dict[int, float]):
    """A rule giving every position the log-prob ``table[number of MASKs in its row]``."""
    def rule(masked):
        counts = masked.sum(dim=1)
        return torch.tensor([table.get(int(c), -0.25) for c in counts], dtype=torch.float64)[:, None]
    return rule


def noisy_rule(masked):
    """A log-prob that depends on the position and on the whole mask pattern (hashed), in (-3, -0.05)."""
    weights = torch.arange(1, masked.shape[1] + 1, dtype=torch.float64)
    code = (masked.double() * weights).sum(dim=1, keepdim=True)
    position = torch.arange(masked.shape[1], dtype=torch.float64)[None, :]
    return -0.05 - 1.45 * (1 + torch.sin(1.7 * code + 0.9 * position + 0.3 * masked.double()))


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -------------------------------------------------------------------------------- D. coupled-GRPO


def test_coupled_worked_numbers():
    """ALGORITHMS.md D: t = 0.4, p0 log-prob −1.0; masked in pass 1 with −0.8 gives −1.5, masked in pass 2
    with −0.6 gives −1.0. Token 0 is in 𝓜 (pass 1), token 1 is not (pass 2)."""
    b = make_batch([[5, 6]], [[7, 8]])

    def rule(masked):  # -9.0: a token not masked in this pass, never read
        pattern = tuple(masked[0].tolist())
        return {(True, True): torch.tensor([[-1.0, -1.0]]),  # p0
                (True, False): torch.tensor([[-0.8, -9.0]]),  # pass 1: 𝓜 = {token 0}
                (False, True): torch.tensor([[-9.0, -0.6]])}[pattern]  # pass 2: the complement

    estimator = CoupledComplementary(mask_token_id=MASK)
    noise = {"t": torch.tensor([0.4]), "first_masked": torch.tensor([[True, False]])}
    scores = estimator.token_logp(ScriptedPolicy(b.completion_ids, rule), b, noise)
    assert scores.logp[0].tolist() == pytest.approx([-1.5, -1.0])
    assert scores.sequence().item() == pytest.approx(-2.5)
    assert [d.weight.item() for d in scores.draws] == pytest.approx([1.0, 1 / 0.4, 1 / 0.6])


def test_coupled_masks_a_complementary_pair_and_a_fully_masked_pass():
    b = make_batch([[5, 6, 7], [PAD, 8, 9]], [[4, 5, 6, 7, 8, 9], [9, 10, 11, EOS, PAD, PAD]],
                   prompt_attention=[[1, 1, 1], [0, 1, 1]], present=[[1] * 6, [1, 1, 1, 1, 0, 0]])
    estimator = make_estimator("coupled", mask_token_id=MASK)
    assert estimator.forwards_per_sample == 3
    present = b.attention_mask[:, 3:].bool()
    for seed in range(20):
        noise = estimator.sample_noise(b, generator(seed))
        t = noise["t"]
        assert (t == t[0]).all() and 0.2 <= t[0] <= 0.8  # one t per call, shared by the batch
        model = ScriptedPolicy(b.completion_ids, noisy_rule)
        scores = estimator.token_logp(model, b, noise)
        assert len(model.inputs) == 3
        for seen in model.inputs:
            assert torch.equal(seen[:, :3], b.prompt_ids)  # the prompt is never masked
        p0, one, two = model.completion_masks()
        assert p0.all()
        assert torch.equal(one, noise["first_masked"])
        assert torch.equal(one ^ two, torch.ones_like(one)) and not (one & two).any()  # complementary
        # every present token is scored exactly once by the pair, and by p0
        pair_count = scores.draws[1].masked.long() + scores.draws[2].masked.long()
        assert torch.equal(pair_count, present.long())
        assert torch.equal(scores.draws[0].masked, present) and torch.equal(scores.scored, present)
        # the value is the released code's ½[ℓ₀ + 1[k∈𝓜]ℓ₁/t + 1[k∉𝓜]ℓ₂/(1−t)]
        l0, l1, l2 = (noisy_rule(m) for m in (p0, one, two))
        want = 0.5 * (l0 + torch.where(one, l1 / t[0], l2 / (1 - t[0])))
        assert torch.allclose(scores.logp, want)
        assert torch.allclose(scores.sequence(), (want * present).sum(dim=1))


def test_coupled_first_pass_masks_each_token_with_probability_t():
    rows, length = 2000, 8
    b = make_batch([[5]] * rows, [[4] * length] * rows)
    noise = CoupledComplementary(mask_token_id=MASK).sample_noise(b, generator(7))
    t = noise["t"][0].item()
    rate = noise["first_masked"].double().mean().item()
    assert abs(rate - t) < 4 * math.sqrt(t * (1 - t) / (rows * length))


# ----------------------------------------------------------------------- A. stratified MC ELBO


def test_stratified_counts_worked_example():
    """ALGORITHMS.md A: L = 4, b = 2, k = 1 gives x = (1, 3); in general x₁ = x₀ + 2 wrapped into 1..4."""
    counts = stratified_mask_counts(torch.full((400,), 4), 2, generator(0))
    first = counts[:, 0]
    assert set(first.tolist()) == {1, 2, 3, 4}  # x₀ = k ~ U{1..L}
    assert {(a, b) for a, b in counts.tolist()} == {(1, 3), (2, 4), (3, 1), (4, 2)}


def test_stratified_elbo_worked_number():
    """ALGORITHMS.md A: row sums of masked CE 2.0 (1 token) and 3.0 (3 tokens): −(2/(1/4) + 3/(3/4))/2 = −6."""
    b = make_batch([[5, 6]], [[4, 5, 6, 7]])
    noise = {"masked": torch.tensor([[[False, False, True, False], [True, True, False, True]]]),
             "counts": torch.tensor([[1, 3]])}
    model = ScriptedPolicy(b.completion_ids, by_mask_count({1: -2.0, 3: -1.0}))
    scores = StratifiedELBO(mask_token_id=MASK, mc_num=2).token_logp(model, b, noise)
    assert scores.sequence().item() == pytest.approx(-6.0)
    assert [d.weight.item() for d in scores.draws] == pytest.approx([4.0, 4 / 3])
    assert torch.equal(scores.scored, torch.ones(1, 4, dtype=torch.bool))


@pytest.mark.parametrize("length,draws", [(4, 2), (6, 4), (5, 2), (7, 4), (8, 3), (3, 6), (9, 9)])
def test_stratified_counts_are_a_shift_of_one_uniform_k(length, draws):
    """Stratification: x_j = x₀ + round(j·L/n) wrapped, the *same* shift whatever k is. Then every x_j is
    uniform on 1..L like x₀, so each draw alone is an unbiased ELBO estimate (Σ_k E[...]/k). Rounding half to
    even (torch.round) breaks this where j·L/n ends in .5: e.g. L = 6, n = 4 gives x₁ ∈ {2, 4, 6} only."""
    counts = stratified_mask_counts(torch.full((600,), length), draws, generator(length * 31 + draws))
    assert counts.min() >= 1 and counts.max() <= length
    k = counts[:, 0]
    assert set(k.tolist()) == set(range(1, length + 1))
    for j in range(draws):
        shift = math.floor(j * length / draws + 0.5)
        assert torch.equal(counts[:, j], (k - 1 + shift) % length + 1), f"draw {j}"
    if draws == length:  # n = L: each row uses every count once
        assert torch.equal(counts.sort(dim=1).values, torch.arange(1, length + 1).expand(600, -1))


def test_stratified_elbo_masks_exactly_x_j_tokens_and_weights_them_by_L_over_x_j():
    b = make_batch([[5, 6, 7], [PAD, PAD, 8]], [[4, 5, 6, 7, 8, 9, 10], [9, 10, 11, EOS, EOS, PAD, PAD]],
                   prompt_attention=[[1, 1, 1], [0, 0, 1]], present=[[1] * 7, [1, 1, 1, 1, 1, 0, 0]],
                   completion_mask=[[1] * 7, [1, 1, 1, 1, 0, 0, 0]])
    present = b.attention_mask[:, 3:].bool()
    lengths = present.sum(dim=1)  # 7 and 5: the padded answer, EOS padding included
    estimator = make_estimator("elbo", mask_token_id=MASK, mc_num=4)
    assert estimator.forwards_per_sample == 4
    for seed in range(10):
        noise = estimator.sample_noise(b, generator(seed))
        masked, counts = noise["masked"], noise["counts"]
        assert masked.shape == (2, 4, 7) and counts.shape == (2, 4)
        assert torch.equal(masked.sum(dim=2), counts)
        assert not (masked & ~present[:, None]).any()  # a shorter row's padding is never masked
        assert (counts >= 1).all() and (counts <= lengths[:, None]).all()
        model = ScriptedPolicy(b.completion_ids, noisy_rule)
        scores = estimator.token_logp(model, b, noise)
        assert len(model.inputs) == 4
        want = torch.zeros(2, dtype=torch.float64)
        for j, (seen, draw) in enumerate(zip(model.completion_masks(), scores.draws)):
            assert torch.equal(model.inputs[j][:, :3], b.prompt_ids)  # the prompt stays visible
            assert torch.equal(seen & present, masked[:, j]) and torch.equal(draw.masked, masked[:, j])
            assert torch.allclose(draw.weight, lengths.double() / counts[:, j])
            want += (noisy_rule(seen) * masked[:, j]).sum(dim=1) * lengths / counts[:, j]
        assert torch.allclose(scores.sequence(), want / 4)
        assert torch.equal(scores.scored, masked.any(dim=1))


def test_elbo_noise_is_shared_between_policies_and_fresh_per_call():
    """VRPO's antithetic sampling: one noise draw scores θ and ref on identical inputs; calls agree exactly."""
    b = make_batch([[5, 6], [7, 8]], [[4, 5, 6, 7, 8, 9], [9, 10, 11, 4, 5, 6]])
    estimator = StratifiedELBO(mask_token_id=MASK, mc_num=3)
    noise = estimator.sample_noise(b, generator(3))
    policy, reference = ScriptedPolicy(b.completion_ids, noisy_rule), ScriptedPolicy(b.completion_ids, lambda m: noisy_rule(m) - 0.3)
    first = estimator.token_logp(policy, b, noise)
    again = estimator.token_logp(policy, b, noise)
    ref = estimator.token_logp(reference, b, noise)
    assert torch.equal(first.logp, again.logp) and torch.equal(first.sequence(), again.sequence())
    for a, c in zip(policy.inputs[:3], reference.inputs):
        assert torch.equal(a, c)
    # ref is θ − 0.3 on every token, so on shared noise each draw's difference is Σ_masked (L/x_j)·0.3 = 0.3·L
    assert torch.allclose(first.sequence() - ref.sequence(), torch.full((2,), 0.3 * 6, dtype=torch.float64))
    other = estimator.sample_noise(b, generator(4))
    assert not torch.equal(other["masked"], noise["masked"])


# ----------------------------------------------------------------------------------- I. ESPO ELBO


def test_paired_elbo_worked_number():
    """ALGORITHMS.md I: L = 3, k = 1 (p = 1/4), masked CE 2.0, complement CEs 0.5 and 0.7 (p′ = 1/2):
    𝓑 = −(8 + 2.4)/2 = −5.2."""
    b = make_batch([[5, 6]], [[4, 5, 6]])

    def rule(masked):
        if masked.sum() == 1:
            return torch.tensor([[-2.0, -9.0, -9.0]])
        return torch.tensor([[-9.0, -0.5, -0.7]])

    noise = {"masked": torch.tensor([[[True, False, False]]]), "counts": torch.tensor([[1]])}
    model = ScriptedPolicy(b.completion_ids, rule)
    scores = PairedELBO(mask_token_id=MASK, mc_num=1).token_logp(model, b, noise)
    assert scores.sequence().item() == pytest.approx(-5.2)
    assert [d.weight.item() for d in scores.draws] == pytest.approx([0.5 * 4, 0.5 * 2])
    assert [m[0].tolist() for m in model.completion_masks()] == [[True, False, False], [False, True, True]]


@pytest.mark.parametrize("rows,length", [(8, 6), (2, 5), (6, 3), (5, 4)])
def test_paired_counts_are_stratified_across_rows(rows, length):
    """k_j = k₀ + round(j(L+1)/B) mod (L+1): every row is the same shift of one k₀ ~ U{0..L}."""
    b = make_batch([[5]] * rows, [[4] * length] * rows)
    estimator = PairedELBO(mask_token_id=MASK, mc_num=1)
    seen_k0 = set()
    for seed in range(120):
        counts = estimator.sample_noise(b, generator(seed))["counts"][:, 0]
        k0 = int(counts[0])
        seen_k0.add(k0)
        shifts = torch.tensor([math.floor(j * (length + 1) / rows + 0.5) for j in range(rows)])
        assert torch.equal(counts, (k0 + shifts) % (length + 1)), f"k0={k0}"
    assert seen_k0 == set(range(length + 1))


def test_paired_elbo_complement_pass_masks_exactly_the_other_tokens():
    b = make_batch([[5, 6], [PAD, 7], [8, 9]], [[4, 5, 6, 7, 8], [9, 10, EOS, PAD, PAD], [11, 4, 5, 6, 7]],
                   prompt_attention=[[1, 1], [0, 1], [1, 1]], present=[[1] * 5, [1, 1, 1, 0, 0], [1] * 5])
    present = b.attention_mask[:, 2:].bool()
    lengths = present.sum(dim=1).double()
    estimator = make_estimator("elbo_pair", mask_token_id=MASK, mc_num=2)
    assert estimator.forwards_per_sample == 4
    for seed in range(15):
        noise = estimator.sample_noise(b, generator(seed))
        assert torch.equal(noise["masked"].sum(dim=2), noise["counts"])
        assert (noise["counts"] <= lengths.long()[:, None]).all()
        model = ScriptedPolicy(b.completion_ids, noisy_rule)
        scores = estimator.token_logp(model, b, noise)
        seen = model.completion_masks()
        assert len(seen) == 4
        want = torch.zeros(3, dtype=torch.float64)
        for j in range(2):
            first, second = seen[2 * j] & present, seen[2 * j + 1] & present
            assert torch.equal(first, noise["masked"][:, j])
            assert torch.equal(second, present & ~first)  # exactly the other tokens
            for i in (2 * j, 2 * j + 1):
                assert torch.equal(model.inputs[i][:, :2], b.prompt_ids)
            p = noise["counts"][:, j] / (lengths + 1)
            masked_term = torch.where(p > 0, (noisy_rule(seen[2 * j]) * first).sum(dim=1) / p.clamp(min=1e-9), 0.0)
            complement = lengths / (lengths + 1) - p  # 0 where k = L: the complement is empty
            complement_term = torch.where(
                complement > 0, (noisy_rule(seen[2 * j + 1]) * second).sum(dim=1) / complement.clamp(min=1e-9), 0.0)
            want += 0.5 * (masked_term + complement_term)
        assert torch.allclose(scores.sequence(), want / 2, rtol=1e-6)
        assert torch.equal(scores.scored, present)


def test_paired_counts_are_uniform_for_shorter_rows_too():
    """A row shorter than the longest must still draw k uniformly on 0..L_row (else its ELBO is biased)."""
    b = make_batch([[5], [6]], [[4] * 5, [4, 4, 4, PAD, PAD]], present=[[1] * 5, [1, 1, 1, 0, 0]])
    estimator = PairedELBO(mask_token_id=MASK, mc_num=1)
    gen = generator(11)
    draws = torch.stack([estimator.sample_noise(b, gen)["counts"][:, 0] for _ in range(3000)])
    for row, length in ((0, 5), (1, 3)):
        frequency = torch.bincount(draws[:, row], minlength=length + 1).double() / len(draws)
        assert frequency.numel() == length + 1
        p = 1 / (length + 1)
        assert (frequency - p).abs().max() < 4 * math.sqrt(p * (1 - p) / len(draws)), (row, frequency)


# ------------------------------------------------------------------------------------- F. SPG block


def test_block_worked_numbers_through_the_spg_losses():
    """ALGORITHMS.md F: o₁ (A = 0.5) masks {2,3}: ELBO −0.6; o₂ (A = −0.5) masks {1,3} of 3 (t = 2/3),
    β_e = 1.5: EUBO −1.329690, ELBO −1.6, mix −1.464845.
    Loss: ELBO-only −0.25, EUBO −0.182422, mix −0.216211."""
    b = make_batch([[5, 6], [7, 8]], [[4, 5, 6], [7, 8, 9]])
    ell = torch.tensor([[-0.5, -1.0, -0.2], [-1.2, -0.3, -2.0]], dtype=torch.float64)
    noise = {"masked": torch.tensor([[[False, True, True]], [[True, False, True]]]),
             "prompt_masked": torch.zeros(2, 1, 2, dtype=torch.bool)}
    model = ScriptedPolicy(b.completion_ids, lambda masked: ell)
    scores = BlockwiseMask(mask_token_id=MASK, block_length=32, num_t=1).token_logp(model, b, noise)
    logps, masks = [d.logp for d in scores.draws], [d.masked for d in scores.draws]
    elbo = spg_elbo(logps, masks)
    eubo = spg_eubo(logps, masks, b.completion_mask, beta=1.5)
    assert elbo.tolist() == pytest.approx([-0.6, -1.6])
    assert eubo[1].item() == pytest.approx(-1.329690, abs=1e-6)
    mix = 0.5 * eubo + 0.5 * elbo
    assert mix[1].item() == pytest.approx(-1.464845, abs=1e-6)
    advantages, lengths = torch.tensor([0.5, -0.5], dtype=torch.float64), torch.tensor([3, 3])
    negative = advantages <= 0
    assert reinforce_loss(elbo, advantages, lengths).item() == pytest.approx(-0.25)
    eubo_loss = reinforce_loss(torch.where(negative, eubo, elbo), advantages, lengths)
    mix_loss = reinforce_loss(torch.where(negative, mix, elbo), advantages, lengths)
    assert eubo_loss.item() == pytest.approx(-0.182422, abs=1e-6)
    assert mix_loss.item() == pytest.approx(-0.216211, abs=1e-6)
    # scores.sequence() is the plain masked sum averaged over draws (no 1/|𝓜|): SPG normalises from the draws
    assert scores.sequence().tolist() == pytest.approx([-1.2, -3.2])


def block_batch():
    """One row of 12 completion tokens, EOS at position 9 (so 10 valid), the last 2 present but past the EOS;
    one row with a shorter completion (8 present, EOS at 5) and a left-padded prompt."""
    return make_batch([[5, 6, 7], [PAD, 8, 9]],
                      [[4, 5, 6, 7, 8, 9, 10, 11, 4, EOS, EOS, EOS],
                       [9, 10, 11, 4, 5, EOS, EOS, EOS, PAD, PAD, PAD, PAD]],
                      prompt_attention=[[1, 1, 1], [0, 1, 1]],
                      present=[[1] * 12, [1] * 8 + [0] * 4],
                      completion_mask=[[1] * 10 + [0] * 2, [1] * 6 + [0] * 6])


def test_block_masks_clean_prefix_partial_block_and_masked_suffix():
    b = block_batch()
    present = b.attention_mask[:, 3:].bool()
    valid = b.completion_mask.bool()
    valid_length = valid.sum(dim=1)
    block, t_min, t_max = 4, 0.3, 0.8
    estimator = make_estimator("block", mask_token_id=MASK, block_length=block, num_t=3, t_min=t_min, t_max=t_max,
                               p_mask_clean=0.0)
    assert estimator.forwards_per_sample == 3
    seen_blocks, seen_counts = {0: set(), 1: set()}, {0: set(), 1: set()}
    for seed in range(50):
        noise = estimator.sample_noise(b, generator(seed))
        assert not noise["prompt_masked"].any()  # p_mask_clean = 0: the prompt stays visible
        model = ScriptedPolicy(b.completion_ids, noisy_rule)
        scores = estimator.token_logp(model, b, noise)
        assert len(model.inputs) == 3
        for j, seen in enumerate(model.completion_masks()):
            assert torch.equal(model.inputs[j][:, :3], b.prompt_ids)
            assert torch.equal(seen & present, noise["masked"][:, j])
            assert torch.equal(scores.draws[j].masked, seen & valid)  # scores the masked valid tokens
            for row in range(2):
                masked = seen[row] & present[row]
                first = int(masked.nonzero()[0])  # block m always masks at least one token
                m = first // block
                start, end = m * block, min((m + 1) * block, int(valid_length[row]))
                size = end - start
                assert not masked[:start].any()  # clean prefix blocks
                assert masked[end:][present[row, end:]].all()  # fully masked suffix, past-EOS positions included
                count = int(masked[start:end].sum())
                low = max(1, math.floor(size * t_min))
                high = max(math.floor(size * t_max), low)
                assert low <= count <= high
                seen_blocks[row].add(m)
                seen_counts[row].add((size, count))
        assert torch.equal(scores.scored, torch.stack([d.masked for d in scores.draws]).any(dim=0))
    assert seen_blocks == {0: {0, 1, 2}, 1: {0, 1}}  # m is drawn among the valid part's blocks
    # every count of the allowed range occurs: sizes 4 -> 1..3 (floor(1.2)=1, floor(3.2)=3), 2 -> 1
    assert seen_counts[0] == {(4, 1), (4, 2), (4, 3), (2, 1)}
    assert seen_counts[1] == {(4, 1), (4, 2), (4, 3), (2, 1)}


def test_block_masks_only_the_prompt_and_the_blocks_before_m_with_p_mask_clean():
    """With p_mask_clean the prompt's real tokens and the tokens of the clean blocks *before* block m are masked
    with that probability (SPG's use_mask_prompt: the official trainer and DARE draw these masks outside the
    region from block m on); block m's unselected tokens stay visible. The same seed with p_mask_clean = 0
    gives the block structure alone (the draws consume the same random numbers)."""
    b = block_batch()
    present = b.attention_mask[:, 3:].bool()
    real_prompt = b.prompt_attention.bool()
    block = 4
    settings = dict(mask_token_id=MASK, block_length=block, num_t=2, t_min=0.0, t_max=1.0)
    plain, noisy = BlockwiseMask(p_mask_clean=0.0, **settings), BlockwiseMask(p_mask_clean=0.25, **settings)
    position = torch.arange(12)
    prompt_hits = prompt_total = before_hits = before_total = 0
    unselected_in_block = 0
    for seed in range(200):
        base, extra = plain.sample_noise(b, generator(seed)), noisy.sample_noise(b, generator(seed))
        assert not base["prompt_masked"].any()
        assert not (extra["prompt_masked"] & ~real_prompt[:, None]).any()  # left padding is never masked
        prompt_hits += int(extra["prompt_masked"].sum())
        prompt_total += int(real_prompt.sum()) * 2
        assert torch.equal(base["masked"] & extra["masked"], base["masked"])  # the block structure is kept
        first = base["masked"].float().argmax(dim=2)  # block m always masks at least one token
        start = first // block * block  # [rows, draws]: the first position of block m
        before = (position[None, None, :] < start[..., None]) & present[:, None]
        added = extra["masked"] & ~base["masked"]
        assert not (added & ~before).any()  # extras only before block m: never in block m or after it
        unselected_in_block += int((~base["masked"] & present[:, None] & ~before).sum())
        before_hits += int(added.sum())
        before_total += int(before.sum())
    assert unselected_in_block > 0  # block m did leave tokens unmasked, and they stayed so
    for hits, total in ((prompt_hits, prompt_total), (before_hits, before_total)):
        assert abs(hits / total - 0.25) < 4 * math.sqrt(0.25 * 0.75 / total)


# ------------------------------------------------------------------------ E/J. trajectory replay


def test_shrink_steps_worked_example():
    """ALGORITHMS.md J: s = 2 maps [0,1,2,3] to [1,1,3,3] (the group's last id); the implementation labels
    the same groups by rank, [0,0,1,1]. Only the partition matters to the replay."""
    assert shrink_steps(torch.tensor([[0, 1, 2, 3]]), 2).tolist() == [[0, 0, 1, 1]]
    assert shrink_steps(torch.tensor([[0, 1, 2, 3]]), 1).tolist() == [[0, 1, 2, 3]]
    # distinct ids are grouped, not raw values; -1 (padding) stays -1
    # distinct ids 2 < 5 < 7 < 9 have ranks 0..3; pairs {2, 5} and {7, 9}
    assert shrink_steps(torch.tensor([[5, 5, 9, 2, 7, -1]]), 2).tolist() == [[0, 0, 1, 0, 1, -1]]
    assert shrink_steps(torch.tensor([[0, 1, 2, 3, 4]]), 3).tolist() == [[0, 0, 0, 1, 1]]


TRAJECTORY_STEPS = [[2, 0, 1, 0, 3, 1], [1, 1, 0, 0, 2, -1]]
GROUPS = {1: [[2, 0, 1, 0, 3, 1], [1, 1, 0, 0, 2, -1]], 2: [[1, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, -1]]}


@pytest.mark.parametrize("shrink", [1, 2])
def test_trajectory_replays_each_step_group_once(shrink):
    b = make_batch([[5, 6], [PAD, 7]], [[4, 5, 6, 7, 8, 9], [9, 10, 11, 4, EOS, PAD]],
                   prompt_attention=[[1, 1], [0, 1]], present=[[1] * 6, [1] * 5 + [0]], unmask_step=TRAJECTORY_STEPS)
    present = b.attention_mask[:, 2:].bool()
    estimator = make_estimator("trajectory", mask_token_id=MASK, shrink=shrink)
    noise = estimator.sample_noise(b, generator(0))
    group = torch.tensor(GROUPS[shrink])
    assert torch.equal(noise["step_group"], group)
    model = ScriptedPolicy(b.completion_ids, noisy_rule)
    scores = estimator.token_logp(model, b, noise)
    groups = int(group.max()) + 1
    assert len(model.inputs) == len(scores.draws) == groups  # one forward per step group
    times_scored = torch.zeros(2, 6, dtype=torch.long)
    want = torch.zeros(2, 6, dtype=torch.float64)
    for g, (seen, draw) in enumerate(zip(model.completion_masks(), scores.draws)):
        assert torch.equal(model.inputs[g][:, :2], b.prompt_ids)
        earlier = (group >= 0) & (group < g)
        assert torch.equal(seen & present, present & ~earlier & (group >= 0))  # reveals exactly earlier groups
        assert torch.equal(model.inputs[g][:, 2:][earlier], b.completion_ids[earlier])
        assert torch.equal(draw.masked, group == g)  # scores the tokens committed in g
        times_scored += draw.masked.long()
        want = torch.where(draw.masked, noisy_rule(seen), want)
    assert torch.equal(times_scored, present.long())  # each token exactly once
    assert torch.equal(scores.scored, present)
    assert torch.allclose(scores.logp, want)


def test_trajectory_worked_example_cj_grpo():
    """ALGORITHMS.md E: o₁ unmasks {1,3} at step 1, {2} at step 2; o₂ {2,3} then {1}; log-probs from the toy
    matrices for θ, old and ref, all scored on the same replayed states. Step losses 0.040643 and −0.045214,
    loss −0.002285 (ε = 0.5, β = 0.04, A^mean = (0.5, −0.5))."""
    b = make_batch([[5], [6]], [[4, 5, 6], [7, 8, 9]], unmask_step=[[0, 1, 0], [1, 0, 0]])
    ell = torch.tensor([[-0.5, -1.0, -0.2], [-1.2, -0.3, -2.0]], dtype=torch.float64)
    ell_old = torch.tensor([[-0.6, -1.0, -0.4], [-1.0, -0.3, -2.5]], dtype=torch.float64)
    ell_ref = torch.tensor([[-0.7, -0.9, -0.2], [-1.2, -0.5, -2.0]], dtype=torch.float64)
    estimator = TrajectoryReplay(mask_token_id=MASK)
    noise = estimator.sample_noise(b)
    models = [ScriptedPolicy(b.completion_ids, lambda m, v=v: v) for v in (ell, ell_old, ell_ref)]
    logp, old, ref = (estimator.token_logp(model, b, noise) for model in models)
    for model in models[1:]:  # identical states for the three policies
        assert all(torch.equal(a, c) for a, c in zip(models[0].inputs, model.inputs))
    assert [d.masked.tolist() for d in logp.draws] == [[[True, False, True], [False, True, True]],
                                                       [[False, True, False], [True, False, False]]]
    per_token, _ = clipped_surrogate(logp.logp, old.logp, torch.tensor([[0.5], [-0.5]], dtype=torch.float64),
                                     epsilon_low=0.5)
    per_token = per_token + 0.04 * kl_penalty(logp.logp, ref.logp, "k3")
    steps = [d.masked for d in logp.draws]
    step_losses = [((per_token * s).sum() / s.sum()).item() for s in steps]
    assert step_losses == pytest.approx([0.040643, -0.045214], abs=1e-6)
    assert step_mean_loss(per_token, steps).item() == pytest.approx(-0.002285, abs=1e-6)


def test_trajectory_without_unmask_step_is_an_error():
    b = make_batch([[5]], [[4, 5]])
    with pytest.raises(ValueError, match="unmask_step"):
        TrajectoryReplay(mask_token_id=MASK).sample_noise(b)


# -------------------------------------------------------------------------- L. exact AR (JustGRPO)


def test_exact_ar_reveals_the_past_and_masks_from_t_on():
    b = make_batch([[5, 6], [PAD, 7]], [[4, 5, 6, 7, EOS], [9, 10, EOS, EOS, PAD]],
                   prompt_attention=[[1, 1], [0, 1]], present=[[1] * 5, [1, 1, 1, 1, 0]],
                   completion_mask=[[1] * 5, [1, 1, 1, 0, 0]])
    present = b.attention_mask[:, 2:].bool()
    estimator = make_estimator("exact_ar", mask_token_id=MASK)
    assert isinstance(estimator, TrajectoryReplay) and estimator.order == "left_to_right"
    model = ScriptedPolicy(b.completion_ids, noisy_rule)
    scores = estimator.token_logp(model, b, estimator.sample_noise(b))
    length = 5
    assert len(model.inputs) == length  # L forwards
    position = torch.arange(length)
    want = torch.zeros(2, length, dtype=torch.float64)
    for t, (seen, draw) in enumerate(zip(model.completion_masks(), scores.draws)):
        assert torch.equal(model.inputs[t][:, :2], b.prompt_ids)
        assert torch.equal(model.inputs[t][:, 2 : 2 + t], b.completion_ids[:, :t])  # o_<t
        assert torch.equal(seen & present, (position >= t) & present)  # M from t on
        assert torch.equal(draw.masked, (position == t) & present)  # reads position t only
        want[:, t] = noisy_rule(seen)[:, t]
    # the whole padded length is scored, post-EOS padding included (but not absent positions)
    assert torch.equal(scores.scored, present)
    assert torch.allclose(scores.sequence(), (want * present).sum(dim=1))


# ------------------------------------------------------------- tiny random model: exact vs Monte Carlo


def random_policy(seed: int = 0):
    from dare_gym.models.tiny import TinyDLLMConfig, TinyDLLMForMaskedLM
    from dare_gym.models.tokenizer import build_char_tokenizer
    from dare_gym.core.policy import DiffusionPolicy

    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    config = TinyDLLMConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, initializer_range=0.2, mask_token_id=tokenizer.mask_token_id)
    model = TinyDLLMForMaskedLM(config).to(torch.float64).eval()
    return DiffusionPolicy(model, tokenizer, family="tiny")


@pytest.fixture(scope="module")
def tiny():
    policy = random_policy(0)
    prompt = policy.tokenizer("q:", add_special_tokens=False)["input_ids"]
    completion = policy.tokenizer("ab1", add_special_tokens=False)["input_ids"] + [policy.tokenizer.eos_token_id] * 2
    return policy, prompt, completion


def repeated(prompt, completion, rows: int, unmask_step=None) -> SequenceBatch:
    return make_batch([prompt] * rows, [completion] * rows, unmask_step=unmask_step)


def token_logp_under(policy, batch: SequenceBatch, masked: torch.Tensor) -> torch.Tensor:
    completion = batch.completion_ids.masked_fill(masked, policy.mask_token_id)
    logits = policy.logits(torch.cat([batch.prompt_ids, completion], dim=1), batch.attention_mask)
    return torch.log_softmax(logits[:, batch.prompt_length :], dim=-1).gather(
        -1, batch.completion_ids[..., None]).squeeze(-1)


@torch.no_grad()
def exact_elbo(policy, prompt, completion) -> float:
    """Σ_k (1/k) E_{|S|=k} Σ_{i∈S} ℓ_i(S), by enumerating all 2^L − 1 masks in one batch."""
    length = len(completion)
    subsets = [s for k in range(1, length + 1) for s in itertools.combinations(range(length), k)]
    masked = torch.zeros(len(subsets), length, dtype=torch.bool)
    for row, s in enumerate(subsets):
        masked[row, list(s)] = True
    b = repeated(prompt, completion, len(subsets))
    per_subset = (token_logp_under(policy, b, masked) * masked).sum(dim=1)
    sizes = masked.sum(dim=1)
    return sum(per_subset[sizes == k].mean().item() / k for k in range(1, length + 1))


@torch.no_grad()
def plain_elbo(policy, b: SequenceBatch, draws: int, gen: torch.Generator) -> torch.Tensor:
    """The unstratified reference: per draw t ~ U(0, 1], each token masked w.p. t, weight 1/t; mean of draws."""
    rows, length = b.completion_ids.shape
    total = torch.zeros(rows, dtype=torch.float64)
    for _ in range(draws):
        t = 1 - torch.rand(rows, generator=gen, dtype=torch.float64)
        masked = torch.rand(rows, length, generator=gen, dtype=torch.float64) < t[:, None]
        total += (token_logp_under(policy, b, masked) * masked).sum(dim=1) / t
    return total / draws


def mean_se(x: torch.Tensor) -> tuple[float, float]:
    return x.mean().item(), x.std().item() / math.sqrt(x.numel())


@torch.no_grad()
def test_trajectory_over_all_orders_is_the_elbo_and_exact_ar_is_one_order(tiny):
    """The any-order identity: the ELBO is the mean over the L! one-token-per-step orders σ of the replayed
    log-likelihood log p_σ(o). So min_σ ≤ ELBO ≤ max_σ, exact_ar is the σ = identity term, and by Jensen the
    ELBO ≤ log mean_σ p_σ(o), the likelihood of the random-order sampler. (No inequality holds between the
    ELBO and the left-to-right log-likelihood alone: a random network is not a consistent joint model.)"""
    policy, prompt, completion = tiny
    length = len(completion)
    orders = list(itertools.permutations(range(length)))
    # unmask_step[k] = the step at which position k is decoded
    steps = [[order.index(k) for k in range(length)] for order in orders]
    b = repeated(prompt, completion, len(orders), unmask_step=steps)
    replay = TrajectoryReplay(mask_token_id=policy.mask_token_id)
    per_order = replay.token_logp(policy.logits, b, replay.sample_noise(b)).sequence()
    elbo = exact_elbo(policy, prompt, completion)
    assert per_order.mean().item() == pytest.approx(elbo, abs=1e-9)
    assert elbo < 0
    assert per_order.min().item() <= elbo <= per_order.max().item()
    mixture = (torch.logsumexp(per_order, dim=0) - math.log(len(orders))).item()
    assert elbo <= mixture < 0
    ar = make_estimator("exact_ar", mask_token_id=policy.mask_token_id)
    single = repeated(prompt, completion, 1)
    exact_ar = ar.token_logp(policy.logits, single, ar.sample_noise(single)).sequence().item()
    assert exact_ar == pytest.approx(per_order[0].item(), abs=1e-9)  # orders[0] is the identity
    # and it equals the direct loop Σ_t log f(o^t | c, o^{<t}, M…M)
    position = torch.arange(length)[None, :]
    direct = sum(token_logp_under(policy, single, position >= t)[0, t].item() for t in range(length))
    assert exact_ar == pytest.approx(direct, abs=1e-9)


@torch.no_grad()
def test_stratified_elbo_is_unbiased_and_has_lower_variance_than_plain(tiny):
    policy, prompt, completion = tiny
    elbo = exact_elbo(policy, prompt, completion)
    replicates, mc_num = 400, 4
    b = repeated(prompt, completion, replicates)
    estimator = StratifiedELBO(mask_token_id=policy.mask_token_id, mc_num=mc_num)
    stratified = estimator.token_logp(policy.logits, b, estimator.sample_noise(b, generator(1))).sequence()
    plain = plain_elbo(policy, b, mc_num, generator(2))  # the same number of forwards per estimate
    (ms, ss), (mp, sp) = mean_se(stratified), mean_se(plain)
    assert (stratified < 0).all() and (plain <= 0).all()  # plain may mask nothing and return 0
    assert abs(ms - elbo) < 4 * ss
    assert abs(mp - elbo) < 4 * sp
    assert abs(ms - mp) < 4 * math.hypot(ss, sp)
    assert stratified.var().item() <= plain.var().item()


@torch.no_grad()
def test_paired_elbo_is_unbiased_and_has_lower_variance_than_plain(tiny):
    """ESPO's ½[Σ_masked ℓ/p + Σ_complement ℓ′/(L/(L+1) − p)], p = k/(L+1), k ~ U{0..L}: the (L+1)
    denominators are exactly what makes each half unbiased (k = 0 contributes only through the complement,
    whose count L − k is again uniform on 0..L), so it estimates the *same* ELBO as the plain estimator."""
    policy, prompt, completion = tiny
    elbo = exact_elbo(policy, prompt, completion)
    rows, calls = 16, 25  # rows of a call are stratified together: a call's mean is one replicate
    b = repeated(prompt, completion, rows)
    estimator = PairedELBO(mask_token_id=policy.mask_token_id, mc_num=1)
    gen = generator(3)
    paired = torch.stack([estimator.token_logp(policy.logits, b, estimator.sample_noise(b, gen)).sequence()
                          for _ in range(calls)])  # [calls, rows]
    assert (paired < 0).all()
    mean, se = mean_se(paired.mean(dim=1))
    assert abs(mean - elbo) < 4 * se
    plain = plain_elbo(policy, repeated(prompt, completion, rows * calls), 2, generator(4))  # 2 forwards each too
    mp, sp = mean_se(plain)
    assert abs(mean - mp) < 4 * math.hypot(se, sp)
    assert paired.flatten().var().item() <= plain.var().item()


@torch.no_grad()
def test_replay_of_a_greedy_rollout_reproduces_the_sampler_states():
    """CJ-GRPO's consistency: replaying a greedy low-confidence rollout from its unmask_step gives, at every
    step group, the state the sampler saw, so each committed token is the argmax of the replay's logits."""
    policy = random_policy(1)
    completion = policy.generate(["hey"], gen_length=8, steps=4, block_length=4, temperature=0.0)[0]
    assert sorted(completion.unmask_step.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    b = make_batch([completion.prompt_ids.tolist()], [completion.completion_ids.tolist()],
                   unmask_step=[completion.unmask_step.tolist()])
    recorded = []

    def logits_fn(input_ids, attention_mask, logits_to_keep=0, clean_ids=None):
        logits = policy.logits(input_ids, attention_mask)
        recorded.append(logits[:, b.prompt_length :])
        return logits[:, -logits_to_keep:] if logits_to_keep else logits

    for shrink, forwards in ((1, 4), (2, 2)):
        recorded.clear()
        replay = TrajectoryReplay(mask_token_id=policy.mask_token_id, shrink=shrink)
        scores = replay.token_logp(logits_fn, b, replay.sample_noise(b))
        assert len(recorded) == len(scores.draws) == forwards
        if shrink == 1:
            for logits, draw in zip(recorded, scores.draws):
                assert torch.equal(logits.argmax(dim=-1)[draw.masked], b.completion_ids[draw.masked])
        assert (scores.logp[scores.scored] < 0).all()
