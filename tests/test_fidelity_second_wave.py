"""The second wave's losses (wd1, AGRPO, GDPO, DMPO), each on a hand-made case against its paper's / official
code's formula written out here in float64 (plain Python), never the function under test.

The algorithm runs through its real path (``advantages`` → ``prepare`` → ``loss``/``backward``) on the scripted
policy of ``helpers.py``, whose log-probabilities the test chooses; each test says what it follows.
"""

from __future__ import annotations

import math

import pytest
import torch

from dare_gym.algorithms import build_config, make_algorithm
from helpers import EOS, MASK, ScriptedPolicy, make_buffer


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
