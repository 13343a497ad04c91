"""The second wave's losses (wd1, AGRPO, GDPO, DMPO), each on a hand-made case against its paper's / official
code's formula written out here in float64 (plain Python), never the function under test.

The algorithm runs through its real path (``advantages`` → ``prepare`` → ``loss``/``backward``) on the scripted
policy of ``helpers.py``, whose log-probabilities the test chooses; each test says what it follows.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from dare_gym.algorithms import build_config, make_algorithm
from dare_gym.algorithms.agrpo import sample_steps
from dare_gym.core.estimators import gauss_legendre
from helpers import EOS, MASK, VOCAB, ScriptedPolicy, clipped, make_buffer


def algorithm(name: str, **options):
    return make_algorithm(name, build_config(name, options), mask_token_id=MASK)


def softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


# ------------------------------------------------------------------------------------------------------ wd1


def test_wd1_is_the_group_softmax_weighted_log_likelihood():
    """wd1's ``compute_loss`` (xiaohangt/wd1 ``rev_grpo_trainer.py``): per group, −Σ softmax(A)·ℓ + Σ softmax(−A)·ℓ
    with ℓ the d1 estimate summed over the completion tokens through the first EOS; A = r − mean(r). Two groups of
    three: rewards (1, 0, 0) give A = (2/3, −1/3, −1/3); the second group's equal rewards give w⁺ = w⁻ and add
    nothing but count as a group in the mean. The gradient of each scored token's log-prob is (w⁻ − w⁺)/#groups."""
    buffer = make_buffer([[7, EOS, EOS], [7, 8, EOS], [8, 9, 7], [7, EOS, EOS], [8, EOS, EOS], [9, EOS, EOS]],
                         completion_mask=[[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 1, 0]],
                         rewards=[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], group_size=3)
    method = algorithm("wd1")
    assert (method.config.num_iterations, method.config.estimator, method.config.psi) == (12, "d1", 1.0)
    assert not method.needs_reference
    buffer = method.advantages(buffer, 3)
    table = [[-0.2, -0.3, -0.9], [-0.4, -0.6, -1.1], [-0.7, -0.8, -0.9],
             [-0.5, -0.5, -0.5], [-0.6, -0.6, -0.6], [-0.7, -0.7, -0.7]]
    leaf = torch.tensor(table, dtype=torch.float64, requires_grad=True)
    theta = ScriptedPolicy(buffer.completion_ids, lambda masked: leaf)
    method.prepare(theta, None, buffer, torch.Generator().manual_seed(0), micro_batch_size=8)
    assert theta.calls == 0  # ratio-free: nothing is scored before the update
    loss, _ = method.backward(theta, buffer, 0, 1.0)
    assert theta.completion_masks()[0].all()  # d1's estimator: the whole completion masked

    advantages = [2 / 3, -1 / 3, -1 / 3]
    plus, minus = softmax(advantages), softmax([-a for a in advantages])
    log_likelihood = [-0.2 - 0.3, -0.4 - 0.6 - 1.1, -0.7 - 0.8 - 0.9]  # through the first EOS
    expected = sum((m - p) * ell for p, m, ell in zip(plus, minus, log_likelihood)) / 2  # two groups
    assert expected == pytest.approx(-0.3681602, abs=1e-6)  # the same formula, evaluated once by hand
    # the weights come from float32 rewards: relative error ~6e-8 on coefficients times |ℓ| ≤ 2.4
    assert loss == pytest.approx(expected, abs=1e-6)
    grad = [[(m - p) / 2] * 3 for p, m in zip(plus, minus)] + [[0.0] * 3] * 3
    scored = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]] + [[1, 1, 0]] * 3, dtype=torch.float64)
    torch.testing.assert_close(leaf.grad, torch.tensor(grad, dtype=torch.float64) * scored, atol=1e-7, rtol=0)

    # ψ sharpens the weights; a minibatch split weighted by its share of rows gives the same loss
    sharp = algorithm("wd1", psi=2.0)
    sharp_buffer = sharp.advantages(make_buffer([[7, EOS, EOS], [7, 8, EOS], [8, 9, 7]],
                                                rewards=[1.0, 0.0, 0.0], group_size=3), 3)
    plus, minus = softmax([2 * a for a in advantages]), softmax([-2 * a for a in advantages])
    torch.testing.assert_close(sharp_buffer.columns["wd1_weight"],
                               torch.tensor([3 * (m - p) for p, m in zip(plus, minus)]), atol=1e-6, rtol=0)
    halves = []
    for rows in ([0, 4, 2], [1, 3, 5]):
        part = buffer.select(torch.tensor(rows))
        scripted = ScriptedPolicy(part.completion_ids, lambda masked, rows=rows: leaf.detach()[rows])
        halves.append(method.loss(scripted, part, 0)[0] * len(rows) / 6)
    assert float(sum(halves)) == pytest.approx(loss, abs=1e-9)


# ---------------------------------------------------------------------------------------------------- AGRPO


def tempered_logp(value: float, temperature: float) -> float:
    """log softmax(z / T) at the target of the scripted policy's logits z: the target's log-prob ``value``, the
    rest of the mass spread evenly over the other VOCAB − 1 tokens."""
    rest = math.log((1 - math.exp(value)) / (VOCAB - 1))
    return value / temperature - math.log(math.exp(value / temperature) + (VOCAB - 1) * math.exp(rest / temperature))


def test_agrpo_is_the_clipped_surrogate_on_monte_carlo_sampled_denoising_steps():
    """AGRPO's ``compute_loss`` (probablyabot/agrpo ``agrpo_trainer.py``): per row, M steps uniform on 0..T_i (T_i
    the last step that committed a non-EOS token); the state before step s (tokens committed at steps ≥ s masked)
    scores, from logits / T_rollout, the tokens step s committed; PPO clip per token; Σ / (B·M). Two rows, A = ±½;
    the scripted log-prob of a token falls by 0.05 per masked position of its row, so the state matters. μ = 2:
    iteration 1 compares π_θ with π_old scored on the same sampled states at prepare."""
    completions = [[7, 8, 9, EOS], [7, 8, 9, EOS]]
    unmask_step = [[0, 1, 1, 2], [1, 0, 2, 3]]  # last content steps: 1 and 2 (the EOS steps only pad)
    buffer = make_buffer(completions, unmask_step=unmask_step, rewards=[1.0, 0.0])
    method = algorithm("agrpo", num_iterations=2, mc_samples=3)
    assert (build_config("agrpo", {}).mc_samples, method.config.epsilon, method.config.beta) == (24, 0.2, 0.0)
    assert method.config.response_mask == "all" and not method.needs_reference
    buffer = method.advantages(buffer, 2)
    assert buffer.advantage.tolist() == [0.5, -0.5]
    buffer.columns["agrpo.temperature"] = torch.tensor([0.5, 0.5])  # what the rollout records
    table_theta = [[-0.3, -0.6, -0.9, -0.2], [-1.2, -0.4, -0.7, -0.5]]
    table_old = [[-0.4, -0.5, -1.0, -0.2], [-1.0, -0.6, -0.5, -0.5]]

    def scripted(table):
        leaf = torch.tensor(table, dtype=torch.float64, requires_grad=True)
        policy = ScriptedPolicy(buffer.completion_ids, lambda masked: leaf - 0.05 * masked.sum(dim=1, keepdim=True))
        policy.tokenizer = SimpleNamespace(eos_token_id=EOS)
        return policy

    old, theta = scripted(table_old), scripted(table_theta)
    method.prepare(old, None, buffer, torch.Generator().manual_seed(5), micro_batch_size=8)
    steps = buffer.columns["agrpo.steps"]
    assert steps.shape == (2, 2, 3)
    assert steps[0].max() <= 1 and steps[1].max() <= 2 and steps.min() >= 0
    loss, _ = method.loss(theta, buffer, 1)

    total = 0.0
    for row, advantage in ((0, 0.5), (1, -0.5)):
        for step in steps[row, 1].tolist():
            masked = sum(1 for s in unmask_step[row] if s >= step)
            for k, committed in enumerate(unmask_step[row]):
                if committed != step:
                    continue
                new = tempered_logp(table_theta[row][k] - 0.05 * masked, 0.5)
                before = tempered_logp(table_old[row][k] - 0.05 * masked, 0.5)
                total += -clipped(math.exp(new - before), advantage, 0.2)
    assert loss.item() == pytest.approx(total / (2 * 3), abs=1e-9)
    backward_loss, _ = method.backward(scripted(table_theta), buffer, 1, 1.0)  # one backward per sampled step
    assert backward_loss == pytest.approx(total / (2 * 3), abs=1e-9)


def test_agrpo_low_discrepancy_steps_cover_each_stratum_once():
    """u = (perm + U)/S: the S = B·M draws fall one in each [k/S, (k+1)/S), so with a common last step T and S a
    multiple of T + 1 every step is drawn exactly S/(T + 1) times."""
    steps = sample_steps(torch.full((4,), 3), 6, low_discrepancy=True, generator=torch.Generator().manual_seed(1))
    assert sorted(torch.bincount(steps.flatten(), minlength=4).tolist()) == [6, 6, 6, 6]


# ----------------------------------------------------------------------------------------------------- GDPO


def test_gauss_legendre_nodes_and_weights_on_the_unit_interval():
    """The 2- and 3-point Gauss–Legendre rules on [0, 1] in closed form: ½ ∓ ½/√3 with weights ½; ½ ∓ ½√(3/5) and ½
    with weights 5/18, 5/18 and 8/18; and a 4-point rule integrates t⁷ exactly (1/8)."""
    nodes, weights = gauss_legendre(2)
    torch.testing.assert_close(nodes, torch.tensor([0.5 - 0.5 / math.sqrt(3), 0.5 + 0.5 / math.sqrt(3)],
                                                   dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-12, rtol=0)
    nodes, weights = gauss_legendre(3)
    half = 0.5 * math.sqrt(3 / 5)
    torch.testing.assert_close(nodes, torch.tensor([0.5 - half, 0.5, 0.5 + half], dtype=torch.float64),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(weights, torch.tensor([5 / 18, 8 / 18, 5 / 18], dtype=torch.float64),
                               atol=1e-12, rtol=0)
    assert [t.tolist() for t in gauss_legendre(1)] == [[0.5], [1.0]]
    nodes, weights = gauss_legendre(4)
    assert float((weights * nodes ** 7).sum()) == pytest.approx(1 / 8, abs=1e-12)


def test_gdpo_is_the_width_normalised_sequence_clip_on_the_quadrature_elbo():
    """GDPO's official compute_loss (KevinRojas1499/GDPO gdpo_trainer.py) and NumericalIntegrationEstimator, by hand:
    node n masks exactly max(1, ⌊t_n·L⌋) of the L = 3 completion positions (EOS padding included: response_mask
    all), 𝓑 = Σ_n w_n/t_n Σ_{masked at t_n} log π; r = exp((𝓑 − 𝓑_old)/L) on the same masks; per sequence
    −min(rA, clip(r, 1 ± 0.5)A) + β·(e^d − d − 1) with d = 𝓑_ref − 𝓑; the mean over sequences; A = R − mean.
    Two nodes (t = ½ ∓ ½/√3, w = ½: 1 and 2 positions masked); the scripted log-prob of a token falls by 0.1 per
    masked position of its row. Row 0 (A = +½) moved far from π_old: its ratio is clipped and only the KL's
    gradient reaches it; row 1's is not. μ = 2, iteration 1 against π_old scored at prepare; β = 0.1."""
    beta = 0.1
    buffer = make_buffer([[7, EOS, EOS], [7, 8, 9]], completion_mask=[[1, 1, 0], [1, 1, 1]], rewards=[1.0, 0.0])
    method = algorithm("gdpo", num_iterations=2, beta=beta, estimator_kwargs={"points": 2})
    defaults = build_config("gdpo", {})
    assert (defaults.epsilon, defaults.num_iterations, defaults.beta, defaults.estimator_kwargs,
            defaults.response_mask) == (0.5, 12, 0.0, {"points": 3}, "all")
    assert not make_algorithm("gdpo", defaults, mask_token_id=MASK).needs_reference and method.needs_reference
    buffer = method.advantages(buffer, 2)
    tables = {"theta": [[-0.3, -0.6, -0.9], [-1.2, -0.4, -0.7]],
              "old": [[-1.1, -1.4, -1.7], [-1.0, -0.6, -0.5]],
              "ref": [[-0.5, -0.2, -1.0], [-1.1, -0.5, -0.9]]}
    leaf = torch.tensor(tables["theta"], dtype=torch.float64, requires_grad=True)

    def scripted(values):
        return ScriptedPolicy(buffer.completion_ids, lambda masked: values - 0.1 * masked.sum(1, keepdim=True))

    method.prepare(scripted(torch.tensor(tables["old"], dtype=torch.float64)),
                   scripted(torch.tensor(tables["ref"], dtype=torch.float64)), buffer,
                   torch.Generator().manual_seed(11), micro_batch_size=8)
    masks = buffer.columns["noise.masked"][:, 1]  # [rows, nodes, L] the masks of iteration 1
    assert masks.sum(dim=-1).tolist() == [[1, 2], [1, 2]]  # max(1, ⌊0.211·3⌋) = 1 and ⌊0.789·3⌋ = 2, every row
    loss, metrics = method.loss(scripted(leaf), buffer, 1)
    loss.backward()

    nodes = [0.5 - 0.5 / math.sqrt(3), 0.5 + 0.5 / math.sqrt(3)]
    total, grad = 0.0, [[0.0] * 3 for _ in range(2)]
    for row, advantage in ((0, 0.5), (1, -0.5)):
        elbo = {name: 0.0 for name in tables}
        for n, t in enumerate(nodes):
            mask = masks[row, n].tolist()
            for name, table in tables.items():
                elbo[name] += 0.5 / t * sum(table[row][k] - 0.1 * sum(mask) for k in range(3) if mask[k])
        ratio = math.exp((elbo["theta"] - elbo["old"]) / 3)
        d = elbo["ref"] - elbo["theta"]
        total += -clipped(ratio, advantage, 0.5) + beta * (math.exp(d) - d - 1)
        clip_active = min(max(ratio, 0.5), 1.5) * advantage < ratio * advantage
        assert clip_active == (row == 0), ratio
        d_elbo = (0.0 if clip_active else -advantage * ratio / 3) + beta * (1 - math.exp(d))  # ∂(per sequence)/∂𝓑
        for n, t in enumerate(nodes):
            for k in range(3):
                if masks[row, n, k]:
                    grad[row][k] += 0.5 / t * d_elbo / 2  # the mean over the two sequences
    assert loss.item() == pytest.approx(total / 2, abs=1e-12)
    torch.testing.assert_close(leaf.grad, torch.tensor(grad, dtype=torch.float64), atol=1e-12, rtol=0)
    assert metrics["clip_fraction"] == 0.5


# ----------------------------------------------------------------------------------------------------- DMPO


def test_dmpo_is_the_tilted_softmax_weighted_denoising_cross_entropy():
    """DMPO's ``wdce`` loss (yuchen-zhu-zyc/DMPO ``dmpo_trainer.py``): ELBOs under p_cur and p_pre on shared antithetic
    masks, (L/m)·Σ_masked log π averaged over the masks; log_rnd = 𝓑_pre − 𝓑_cur; per group c = softmax(log_rnd + r/α)
    − softmax(log_rnd − r/α); loss = mean over groups of Σ_i c_i (1/R) Σ_j Σ_{masked in j} −log π_θ / m_ij. One group
    of three (rewards 1, 0, ½) and one of two, α = ½ so that both terms of the weights matter; the scripted log-prob
    falls by 0.1 per masked position of its row (each mask's state matters)."""
    completions = [[7, 8, EOS], [7, EOS, EOS], [8, 9, 7], [9, 9, EOS], [7, 7, 7]]
    buffer = make_buffer(completions, rewards=[1.0, 0.0, 0.5, 0.0, 1.0])
    buffer.group_id = torch.tensor([0, 0, 0, 1, 1])
    method = algorithm("dmpo", alpha=0.5)
    defaults = build_config("dmpo", {})
    assert (defaults.alpha, defaults.num_iterations, defaults.num_replicates, defaults.response_mask) == \
        (0.04, 8, 4, "all")
    assert method.needs_reference
    tables = {"cur": [[-0.3, -0.6, -0.2], [-0.9, -0.1, -0.1], [-1.2, -0.4, -0.7], [-0.5, -0.5, -0.3], [-0.2, -0.8, -0.4]],
              "pre": [[-0.5, -0.4, -0.2], [-0.6, -0.2, -0.1], [-1.0, -0.9, -0.5], [-0.4, -0.7, -0.3], [-0.3, -0.6, -0.9]],
              "theta": [[-0.4, -0.5, -0.3], [-0.8, -0.2, -0.2], [-1.1, -0.5, -0.6], [-0.6, -0.4, -0.2], [-0.3, -0.7, -0.5]]}

    def scripted(name):
        table = torch.tensor(tables[name], dtype=torch.float64)
        return ScriptedPolicy(buffer.completion_ids, lambda masked: table - 0.1 * masked.sum(1, keepdim=True))

    method.prepare(scripted("cur"), scripted("pre"), buffer, torch.Generator().manual_seed(4), micro_batch_size=8)
    elbo_masks, loss_masks = buffer.columns["dmpo.elbo_masks"], buffer.columns["dmpo.masks"][:, 0]
    assert (elbo_masks[:, 2:] == ~elbo_masks[:, :2]).all() and (loss_masks[:, 2:] == ~loss_masks[:, :2]).all()
    loss, _ = method.loss(scripted("theta"), buffer, 0)

    def elbo(name, row):
        total = 0.0
        for mask in elbo_masks[row].tolist():
            m = sum(mask)
            total += (3 / max(m, 1)) * sum(tables[name][row][k] - 0.1 * m for k in range(3) if mask[k])
        return total / len(elbo_masks[row])

    log_rnd = [elbo("pre", row) - elbo("cur", row) for row in range(5)]
    rewards = [1.0, 0.0, 0.5, 0.0, 1.0]
    expected = 0.0
    for group in ([0, 1, 2], [3, 4]):
        plus = softmax([log_rnd[i] + rewards[i] / 0.5 for i in group])
        minus = softmax([log_rnd[i] - rewards[i] / 0.5 for i in group])
        for i, p, q in zip(group, plus, minus):
            cross_entropy = 0.0
            for mask in loss_masks[i].tolist():
                m = sum(mask)
                cross_entropy += sum(-(tables["theta"][i][k] - 0.1 * m) for k in range(3) if mask[k]) / max(m, 1)
            expected += (p - q) * cross_entropy / len(loss_masks[i])
    expected /= 2  # the mean over the two groups
    # the weights are kept in float32 (log_rnd up to ~1, r/α 2): relative error ~1e-7 on terms of size ~3
    assert loss.item() == pytest.approx(expected, abs=2e-6)
