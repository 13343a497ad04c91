"""Each algorithm's whole loss through its real code path (``advantages`` → ``prepare`` → ``loss``/``backward``),
on hand-computed cases (reference/ALGORITHMS.md's worked numbers where they exist).

The policy here is *scripted* (tests/helpers.py): the log-probability of every completion token is a value the
test chooses, so every estimate, ratio and loss is computable by hand; the rest is the library's own code.
"""

from __future__ import annotations

import math

import pytest
import torch

from dare_gym.algorithms import build_config, make_algorithm, mdpo
from helpers import EOS, MASK, ScriptedPolicy, clipped, constant, k3, make_buffer

ELL = [[-0.5, -1.0, -0.2], [-1.2, -0.3, -2.0]]  # the toy log-prob matrices of ALGORITHMS.md §0
ELL_OLD = [[-0.6, -1.0, -0.4], [-1.0, -0.3, -2.5]]
ELL_REF = [[-0.7, -0.9, -0.2], [-1.2, -0.5, -2.0]]

def algorithm(name: str, **options):
    return make_algorithm(name, build_config(name, options), mask_token_id=MASK)


# ------------------------------------------------------------------------------------------- TraceRL


@pytest.mark.parametrize("block_size,expected", [(None, -0.726979), (2, -0.727009)])
def test_tracerl_whole_loss_follows_the_models_attention(block_size, expected):
    """ALGORITHMS.md J through the real path: one row [a, EOS | EOS, EOS] decoded in two steps, tokens 1–2 at
    step 0 (the targets: ℓ − ℓ_old = (0.1, −0.05)), the post-EOS tokens at step 1 (no targets), A = 0.7071,
    β = 0.01 (KL against π_old). A full-attention policy (block_size None) normalises the row by its own 2
    targets and sums the KL: −1.45408/2 + 0.01·0.006108 = −0.726979. A block-causal one (SDAR) keeps
    (−1.45408 + 0.01·0.006108)/L₁ with L₁ the longest response of the batch, here this row's 2 tokens:
    −0.727009 (test_fidelity has a batch where L₁ differs from every row's own count)."""
    buffer = make_buffer([[7, EOS, EOS, EOS]], completion_mask=[[1, 1, 0, 0]], unmask_step=[[0, 0, 1, 1]],
                         rewards=[1.0], group_size=1)
    buffer.advantage = torch.tensor([0.7071])
    method = algorithm("tracerl", num_iterations=2)
    old = ScriptedPolicy(buffer.completion_ids, constant([[-1.0, -1.0, -0.5, -0.5]]), block_size=block_size)
    new = ScriptedPolicy(buffer.completion_ids, constant([[-0.9, -1.05, -0.1, -0.1]]), block_size=block_size)
    method.prepare(old, None, buffer, torch.Generator().manual_seed(0), micro_batch_size=8)
    loss, metrics = method.loss(new, buffer, 1)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["rows"] == 1.0  # the post-EOS step has no targets: no row


# ------------------------------------------------------------------------------------------------ ESPO


def paired_elbo_by_hand(c: float, count: int, length: int) -> float:
    """ESPO's pair on a row whose every token has log-prob c: ½[Σ_masked c/p + Σ_complement c/(L/(L+1) − p)],
    p = k/(L+1); an empty side contributes nothing."""
    p = count / (length + 1)
    first = count * c / p if count > 0 else 0.0
    second = (length - count) * c / (length / (length + 1) - p) if count < length else 0.0
    return 0.5 * (first + second)


def test_espo_whole_loss():
    """Rows of L = 4 with one log-prob per policy (θ, old, ref) per row, so each ELBO follows from the
    stratified mask counts the estimator drew (read back from the buffer). ρ = exp((𝓑 − 𝓑_old)/L), clip 0.2,
    RLOO advantages (1, −1), β·½(𝓑 − 𝓑_ref)²/L."""
    buffer = make_buffer([[7, 8, 9, 10], [7, 9, 8, 11]])
    method = algorithm("espo", num_iterations=2, estimator_kwargs={"mc_num": 1})
    buffer = method.advantages(buffer, 2)
    assert buffer.advantage.tolist() == [1.0, -1.0]
    c = {"theta": [-0.48, -0.9], "old": [-0.54, -0.84], "ref": [-0.5, -0.8]}
    policies = {k: ScriptedPolicy(buffer.completion_ids, constant([[v[0]] * 4, [v[1]] * 4])) for k, v in c.items()}
    method.prepare(policies["old"], policies["ref"], buffer, torch.Generator().manual_seed(3), micro_batch_size=8)
    loss = method.loss(policies["theta"], buffer, 1)[0].item()
    counts = buffer.columns["noise.counts"][:, 1, 0].tolist()  # iteration 1, the only pair
    expected = 0.0
    for row, (count, advantage) in enumerate(zip(counts, (1.0, -1.0))):
        elbo, old, ref = (paired_elbo_by_hand(c[k][row], count, 4) for k in ("theta", "old", "ref"))
        expected += -clipped(math.exp((elbo - old) / 4), advantage, 0.2) / 2 + 1e-3 * 0.5 * (elbo - ref) ** 2 / 4 / 2
    assert loss == pytest.approx(expected, abs=1e-9)


# ------------------------------------------------------------------------------------------------ BGPO


def test_bgpo_whole_loss_weighs_sequences_by_length():
    """ALGORITHMS.md G's numbers through the real path (n = 2, ε = 0.2, dual-clip 3, verl's A = (r − r̄)/(σ + 1e-6)
    = ±0.707106) on rows of L = 2 whose log-prob depends on how many tokens the draw masks (x ∈ {1, 2}: the
    stratified counts always use both), so 𝓑_j = c(x_j): 𝓑 = [[−0.50, −0.70], [−1.0, −1.2]], 𝓑_old =
    [[−0.55, −0.65], [−1.1, −1.1]]. With ``response_mask: through_eos`` (DARE's SDAR/LLaDA2 rollouts) row 2 ends at
    its first token (EOS), so the rows weigh 2 : 1 in DARE's token mean: sample 1 (2·−0.742357 + 0.781364)/3,
    sample 2 (2·−0.671657 + 0.639726)/3, mean −0.234522 (the sequence mean of section G gives 0.001769)."""
    buffer = make_buffer([[7, 8], [EOS, EOS]], completion_mask=[[1, 1], [1, 0]])
    method = algorithm("bgpo", estimator_kwargs={"mc_num": 2}, response_mask="through_eos")
    buffer = method.advantages(buffer, 2)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert buffer.advantage.tolist() == pytest.approx([a, -a], abs=1e-7)

    def by_count(table):  # row -> {mask count: log-prob of each masked token}
        return lambda masked: torch.tensor([[table[row][int(masked[row].sum())]] for row in range(2)],
                                           dtype=torch.float64)

    leaves = torch.tensor([[-0.50, -0.70], [-1.0, -1.2]], dtype=torch.float64, requires_grad=True)
    theta = ScriptedPolicy(buffer.completion_ids, lambda m: torch.stack(
        [leaves[row, int(m[row].sum()) - 1].expand(2) for row in range(2)]))
    old = ScriptedPolicy(buffer.completion_ids, by_count({0: {1: -0.55, 2: -0.65}, 1: {1: -1.1, 2: -1.1}}))
    method.prepare(old, None, buffer, torch.Generator().manual_seed(0), micro_batch_size=8)
    loss, metrics = method.backward(theta, buffer, 0, 1.0)
    sample_one = (2 * -clipped(1.05, a, 0.2) - max(clipped(math.exp(0.1), -a, 0.2), 3 * -a)) / 3
    sample_two = (2 * -clipped(0.95, a, 0.2) - max(clipped(math.exp(-0.1), -a, 0.2), 3 * -a)) / 3
    assert (sample_one, sample_two) == pytest.approx((-0.234483, -0.234562), abs=1e-6)
    assert loss == pytest.approx((sample_one + sample_two) / 2, abs=1e-6)
    assert loss == pytest.approx(-0.234522, abs=1e-6)
    assert metrics["mc_samples"] == 2.0
    # one backward per sample reached every draw's log-probs; row 2's one-token draw (A < 0, unclipped; the
    # token's weight n/x = 2 over Lpad = 2 is 1) gets −A·e^d · (1/3 of the token mean) · (1/n)
    assert leaves.grad is not None and (leaves.grad != 0).all()
    assert leaves.grad[1, 0].item() == pytest.approx(a * math.exp(0.1) * 1 / 3 / 2, abs=1e-6)


# ------------------------------------------------------------------------------------------------- SPG


def test_spg_whole_loss_with_mixed_bounds():
    """SPG's REINFORCE on block-masked bounds, computed by hand from the masks the estimator drew: for
    A > 0 the ELBO (mean log-prob of the masked valid tokens, averaged over draws), for A ≤ 0 the mix
    ω·EUBO + (1 − ω)·ELBO with EUBO = (1/β_e)·mean_k log mean_j[1[k∈𝓜_j] p_k^β_e / t_j]; weighted by length,
    Σ_i −A_i ℓ̂_i |o_i| / Σ_i |o_i|. Rows of unequal valid length (3 and 2)."""
    buffer = make_buffer([[7, 8, 9], [7, EOS, EOS]], completion_mask=[[1, 1, 1], [1, 1, 0]])
    method = algorithm("spg", estimator_kwargs={"block_length": 2, "num_t": 2, "p_mask_clean": 0.0})
    buffer = method.advantages(buffer, 2)
    assert buffer.advantage.tolist() == [0.5, -0.5]
    theta = ScriptedPolicy(buffer.completion_ids, constant(ELL))
    method.prepare(theta, None, buffer, torch.Generator().manual_seed(5), micro_batch_size=8)
    loss = method.loss(theta, buffer, 0)[0].item()
    masks = buffer.columns["noise.masked"][:, 0].tolist()  # [row][draw][position]
    valid = buffer.completion_mask.tolist()
    expected_terms, lengths = [], []
    for row, advantage in enumerate((0.5, -0.5)):
        length = sum(valid[row])
        draws = [[m and v for m, v in zip(draw, valid[row])] for draw in masks[row]]
        elbo = sum(sum(ELL[row][k] for k in range(3) if d[k]) / sum(d) for d in draws) / len(draws)
        score = elbo
        if advantage <= 0:
            seen = [k for k in range(3) if any(d[k] for d in draws)]
            eubo = sum(math.log(sum(math.exp(1.5 * ELL[row][k]) / (sum(d) / length) for d in draws if d[k])
                                / len(draws)) for k in seen) / len(seen) / 1.5
            score = 0.5 * eubo + 0.5 * elbo
        expected_terms.append(-advantage * score * length)
        lengths.append(length)
    assert loss == pytest.approx(sum(expected_terms) / sum(lengths), abs=1e-9)


# ------------------------------------------------------------------------------------------------ MDPO


def test_mdpo_whole_loss():
    """ALGORITHMS.md H through the real path (T = 3, G = 2, all 3 steps trained): R(o₁) = (0,1,1), R(o₂) =
    (0,0,1) give A = [[0.706907, 0.707007, −0.707007], [−0.706907, −0.707007, 0.707007]]. Tokens are committed
    at steps (0, 1, 2), so x_t masks 3, 2, 1 tokens (λ_t = 3/(n + 1e-4)); on-policy (ρ = 1) the loss of step t
    is Σ −A·λ_t·conf / #masked, and step 1's is section H's −0.053022 (conf (0.9, 0.6) and (0.8, 0.5))."""
    buffer = make_buffer([[7, 8, 9], [9, 8, 7]], unmask_step=[[0, 1, 2], [0, 1, 2]])
    buffer.columns[mdpo.STEP_REWARD] = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    buffer.columns[mdpo.STEP_PREDICTION] = buffer.completion_ids[:, None, :].expand(2, 3, 3).clone()
    confidence = torch.tensor([[[0.7, 0.4, 0.3], [1.0, 0.9, 0.6], [1.0, 1.0, 0.95]],
                               [[0.2, 0.6, 0.5], [1.0, 0.8, 0.5], [1.0, 1.0, 0.85]]])
    buffer.columns[mdpo.STEP_CONFIDENCE] = confidence
    method = algorithm("mdpo", train_steps=3)
    buffer = method.advantages(buffer, 2)
    advantages = buffer.columns[mdpo.STEP_ADVANTAGE]
    assert advantages.tolist()[0] == pytest.approx([0.706907, 0.707007, -0.707007], abs=1e-6)
    policy = ScriptedPolicy(buffer.completion_ids, lambda masked: -0.3 - 0.1 * masked.double())
    method.prepare(policy, None, buffer, None, micro_batch_size=8)
    assert sorted(buffer.columns[mdpo.TRAIN_STEPS][0].tolist()) == [0, 1, 2]
    loss = method.loss(policy, buffer, 0)[0].item()
    step_losses = []
    for t in range(3):
        masked = range(t, 3)  # unmask_step >= t
        lam = 3 / (len(masked) + 1e-4)
        total = sum(-advantages[i, t].item() * lam * confidence[i, t, k].item() for i in range(2) for k in masked)
        step_losses.append(total / (2 * len(masked)))
    assert step_losses[1] == pytest.approx(-0.053022, abs=1e-6)
    assert loss == pytest.approx(sum(step_losses) / 3, abs=1e-6)


# ------------------------------------------------------------------------------------------------- PPO


class ScriptedValues:
    """A value model whose value of each completion position is ``table[row][masked count of the state][k]``."""

    def __init__(self, table, prompt_width: int, length: int):
        self.table, self.prompt_width, self.length = table, prompt_width, length

    def __call__(self, input_ids, attention_mask):
        masked = input_ids[:, -self.length:] == MASK
        values = torch.zeros(input_ids.shape, dtype=torch.float64)
        for row in range(input_ids.shape[0]):
            row_values = self.table[row].get(int(masked[row].sum()), [0.0] * self.length)
            values[row, -self.length:] = torch.tensor(row_values, dtype=torch.float64)
        return values


def test_ppo_whole_loss_with_step_gae_wired_to_tokens():
    """Row 1 commits tokens at steps (0, 1, 1, 2) with reward 1: token values 0.2 | 0.4, 0.6 | 0.8 read in the
    state before each step give V* = (0.2, 0.5, 0.8) and, with r* = (0, 0, 1), section M's A* = (0.8, 0.5,
    0.2), R* = (1, 1, 1); per token A_k = r_k − V_k + V*_next + A*_next = (0.8, 0.6, 0.4, 0.2) (= R − V at
    γ = λ = 1). Row 2 commits at (0, 0, 1, 1) with reward 0 and values (0.3, 0.1 | 0.5, 0.5): A = −V.
    On-policy the loss is TraceRL's L₁ row loss of −A plus the value rows ½(V − R)² / L₁."""
    buffer = make_buffer([[7, 8, 9, 10], [9, 8, 7, 10]], unmask_step=[[0, 1, 1, 2], [0, 0, 1, 1]])
    method = algorithm("ppo")
    method.value_model = ScriptedValues(
        [{4: [0.2, 0.0, 0.0, 0.0], 3: [0.0, 0.4, 0.6, 0.0], 1: [0.0, 0.0, 0.0, 0.8]},
         {4: [0.3, 0.1, 0.0, 0.0], 2: [0.0, 0.0, 0.5, 0.5]}], prompt_width=2, length=4)
    policy = ScriptedPolicy(buffer.completion_ids, constant([[-0.5] * 4, [-0.7] * 4]))
    buffer = method.advantages(buffer, 2)
    method.prepare(policy, None, buffer, torch.Generator().manual_seed(0), micro_batch_size=8)
    assert buffer.columns["token_advantage"][0].tolist() == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert buffer.columns["token_return"][0].tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0])
    assert buffer.columns["token_advantage"][1].tolist() == pytest.approx([-0.3, -0.1, -0.5, -0.5])
    assert buffer.columns["token_return"][1].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0])
    loss, metrics = method.loss(policy, buffer, 0)
    # rows: (row 1: {0}, {1, 2}, {3}; row 2: {0, 1}, {2, 3}), each Σ / L₁ with L₁ = 4
    policy_rows = [-0.8 / 4, -(0.6 + 0.4) / 4, -0.2 / 4, (0.3 + 0.1) / 4, (0.5 + 0.5) / 4]
    value_rows = [0.5 * 0.8 ** 2 / 4, 0.5 * (0.6 ** 2 + 0.4 ** 2) / 4, 0.5 * 0.2 ** 2 / 4,
                  0.5 * (0.3 ** 2 + 0.1 ** 2) / 4, 0.5 * (0.5 ** 2 * 2) / 4]
    assert metrics["value_loss"] == pytest.approx(sum(value_rows) / 5)
    assert loss.item() == pytest.approx(sum(policy_rows) / 5 + sum(value_rows) / 5)


# -------------------------------------------------------------------------------------------- JustGRPO


def test_justgrpo_whole_loss_and_gradient():
    """ALGORITHMS.md L: the toy batch, A^std, on-policy: the loss is 0 (Σ A = 0) and ∂loss/∂ℓ_{1,t} =
    −A₁/(L·N_valid) = −0.707007/6 = −0.117834, each ℓ_{1,t} read from its own left-to-right forward."""
    buffer = make_buffer([[7, 8, 9], [9, 8, 7]])
    method = algorithm("justgrpo")
    buffer = method.advantages(buffer, 2)
    leaves = torch.tensor(ELL, dtype=torch.float64, requires_grad=True)
    policy = ScriptedPolicy(buffer.completion_ids, lambda masked: leaves)
    method.prepare(policy, None, buffer, None, micro_batch_size=8)
    calls = policy.calls
    loss, _ = method.loss(policy, buffer, 0)
    assert policy.calls - calls == 3  # L forwards
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert leaves.grad[0].tolist() == pytest.approx([-0.117834] * 3, abs=1e-6)
    assert leaves.grad[1].tolist() == pytest.approx([0.117834] * 3, abs=1e-6)


# ---------------------------------------------------------------------------------------- coupled-GRPO


def test_coupled_grpo_whole_loss():
    """Each pass gives every token the toy log-prob of its policy (θ: ℓ, old: ℓ_old, ref: ℓ_ref), so the coupled
    estimate of a token is ½[ℓ + ℓ/t] when the first pass masks it, ½[ℓ + ℓ/(1 − t)] otherwise, with t and
    the mask read back from the buffer. RLOO advantages (1, −1), ε = 0.5, β = 0.01·k3, token mean (bnpo)."""
    buffer = make_buffer([[7, 8, 9], [9, 8, 7]])
    method = algorithm("coupled_grpo")
    buffer = method.advantages(buffer, 2)
    assert buffer.advantage.tolist() == [1.0, -1.0]
    theta, old, ref = (ScriptedPolicy(buffer.completion_ids, constant(v)) for v in (ELL, ELL_OLD, ELL_REF))
    method.prepare(old, ref, buffer, torch.Generator().manual_seed(1), micro_batch_size=8)
    loss = method.loss(theta, buffer, 1)[0].item()
    t = buffer.columns["noise.t"][0, 1].item()
    first = buffer.columns["noise.first_masked"][:, 1].tolist()

    def coupled(value, row, k):
        return 0.5 * (value + (value / t if first[row][k] else value / (1 - t)))

    terms = []
    for row, advantage in enumerate((1.0, -1.0)):
        for k in range(3):
            logp, logp_old, logp_ref = (coupled(m[row][k], row, k) for m in (ELL, ELL_OLD, ELL_REF))
            terms.append(-clipped(math.exp(logp - logp_old), advantage, 0.5) + 0.01 * k3(logp, logp_ref))
    assert loss == pytest.approx(sum(terms) / 6, abs=1e-9)
    assert 0.2 <= t <= 0.8


# ------------------------------------------------------------------------------------- loss_type: dapo


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo"])
def test_dapo_normalises_by_the_whole_batch_across_minibatches(loss_type):
    """Four rows of 3, 1, 2, 2 scored tokens, A = (0.5, −0.5, 0.5, −0.5), on-policy (per-token loss −A).
    Trained as minibatches {0, 2} and {1, 3} weighted 2/4 each: dapo gives Σ_batch ℓ / N_batch =
    −(1.5 − 0.5 + 1.0 − 1.0)/8 = −0.125 whatever the split (TRL's definition); bnpo averages each minibatch's
    token mean: ½(−2.5/5) + ½(1.5/3) = 0."""
    buffer = make_buffer([[7, 8, 9], [7, EOS, EOS], [8, 9, EOS], [9, 7, EOS]],
                         completion_mask=[[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]])
    method = algorithm("d1", loss_type=loss_type, num_iterations=1, beta=0.0)
    buffer = method.advantages(buffer, 2)
    assert buffer.advantage.tolist() == [0.5, -0.5, 0.5, -0.5]
    method.prepare(ScriptedPolicy(buffer.completion_ids, constant(-0.5)), None, buffer,
                   torch.Generator().manual_seed(0), micro_batch_size=8)
    total = 0.0
    for rows in ([0, 2], [1, 3]):
        batch = buffer.select(torch.tensor(rows))
        policy = ScriptedPolicy(batch.completion_ids, constant(-0.5))
        total += len(rows) / len(buffer) * method.loss(policy, batch, 0)[0].item()
    assert total == pytest.approx(-0.125 if loss_type == "dapo" else 0.0, abs=1e-9)
    whole = method.loss(ScriptedPolicy(buffer.completion_ids, constant(-0.5)), buffer, 0)[0].item()
    assert whole == pytest.approx(-0.125, abs=1e-9)  # one minibatch: dapo and bnpo agree


def test_dapo_without_the_batch_count_is_an_error():
    buffer = make_buffer([[7, 8], [8, 7]])
    method = algorithm("d1", loss_type="dapo", num_iterations=1, beta=0.0)
    buffer = method.advantages(buffer, 2)
    policy = ScriptedPolicy(buffer.completion_ids, constant(-0.5))
    method.store_noise(policy, buffer, torch.Generator().manual_seed(0))  # noise, but not the batch's token count
    with pytest.raises(ValueError, match="dapo.*prepare"):
        method.loss(policy, buffer, 0)


# -------------------------------------------------------------------------------- log-ratio / KL clamps


def test_clamp_options_keep_todays_loss_by_default_and_bound_it_when_set():
    """Row 2 (A = −1) has a token whose log-ratio is 30 (ρ = e³⁰) and one the reference finds 25 nats likelier
    (k3 = e²⁵ − 26); its other terms are ρ = 1 (loss 1) and zero KL. Without clamps the token mean is
    (e³⁰ + 1 + 0.04·(e²⁵ − 26))/4; log_ratio_clamp 20 and kl_clamp 10 (verl's) make it (e²⁰ + 1 + 0.04·10)/4."""
    buffer = make_buffer([[7, 8], [8, 7]])
    buffer.advantage = torch.tensor([0.0, -1.0])
    new = [[-1.0, -1.0], [-0.5, -26.0]]
    old, ref = [[-1.0, -1.0], [-30.5, -26.0]], [[-1.0, -1.0], [-0.5, -1.0]]
    losses = {}
    for clamps in ({}, {"log_ratio_clamp": 20.0, "kl_clamp": 10.0}):
        method = algorithm("d1", num_iterations=2, beta=0.04, epsilon=0.2, **clamps)
        method.prepare(ScriptedPolicy(buffer.completion_ids, constant(old)),
                       ScriptedPolicy(buffer.completion_ids, constant(ref)), buffer,
                       torch.Generator().manual_seed(0), micro_batch_size=8)
        losses[bool(clamps)] = method.loss(ScriptedPolicy(buffer.completion_ids, constant(new)), buffer, 1)[0].item()
    assert losses[False] == pytest.approx((math.exp(30.0) + 1 + 0.04 * k3(-26.0, -1.0)) / 4, rel=1e-9)
    assert losses[True] == pytest.approx((math.exp(20.0) + 1 + 0.04 * 10.0) / 4, rel=1e-9)


def test_clamp_options_are_documented_and_validated():
    from dare_gym.core.config import describe_fields
    from dare_gym.algorithms import get_algorithm

    lines = "\n".join(describe_fields(get_algorithm("tracerl").config_class))
    assert "log_ratio_clamp=null" in lines and "verl uses 20" in lines
    assert "kl_clamp=null" in lines and "verl clamps k3 to 10" in lines
    assert "log_ratio_clamp=null" in "\n".join(describe_fields(get_algorithm("mdpo").config_class))
    with pytest.raises(ValueError, match="kl_clamp must be a number > 0 or null, got 0"):
        build_config("d1", {"kl_clamp": 0})
    with pytest.raises(ValueError, match="log_ratio_clamp must be a number > 0 or null, got -1"):
        build_config("mdpo", {"log_ratio_clamp": -1})


@pytest.mark.parametrize("name, keeps", [("sft", False), ("mdpo", False), ("tracerl", False), ("dpo", True),
                                         ("d1", True), ("ebpo", True), ("dtreerpo", True)])
def test_a_reference_model_is_kept_only_where_the_loss_uses_one(name, keeps):
    """With a KL weight set (where the config has one), only algorithms whose loss scores π_ref keep a
    reference: SFT and MDPO have no KL field, TraceRL's KL is against π_old."""
    options = {} if name in ("mdpo", "sft") else {"beta": 0.1}
    algorithm = make_algorithm(name, build_config(name, options), mask_token_id=3)
    assert algorithm.needs_reference is keeps
