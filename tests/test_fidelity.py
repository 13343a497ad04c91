"""The places where an algorithm's official code decides the gradient, each pinned by an independent computation.

Every expected number here comes from the official code's formula written out by hand in the test (plain
Python or one-off tensor arithmetic), never from the function under test; the algorithm runs through its real
path (``advantages`` → ``prepare`` → ``loss``/``backward``). Covered: which tokens a loss scores
(``response_mask``), uniform groups in the normaliser, the block-causal noisy/clean forward of every random-mask
estimator, MDPO's tempered training log-probs and tempered commits, TraceRL's L₁ and data filter, d-TreeRPO's
per-parent schedule, and SDAR's decoding rules in ``block_diffusion``.
"""

from __future__ import annotations

import math

import pytest
import torch

from dare_gym.algorithms import build_config, make_algorithm, mdpo
from dare_gym.core.buffer import CORRECT, ENDED
from helpers import random_tiny, EOS, MASK, ScriptedPolicy, clipped, constant, make_buffer

EOT = 11  # an end-of-turn id of the scripted vocabulary (not a stop token of the scripted policies)


def algorithm(name: str, **options):
    return make_algorithm(name, build_config(name, options), mask_token_id=MASK)


# ------------------------------------------------------------------------------------------ response masks


def test_response_mask_rules_on_a_chat_completion():
    """A completion "a b EOT EOS EOS" of a chat model whose stop tokens are EOS and EOT: d1 (TRL) scores through
    the first EOS (EOT included), coupled-GRPO through the first end-of-turn, TraceRL the tokens before the EOS,
    CJ-GRPO/ESPO/BGPO every position."""
    policy = random_tiny()
    eos = policy.tokenizer.eos_token_id
    eot = policy.tokenizer.convert_tokens_to_ids("b")  # stands in for the chat model's end-of-turn token
    policy.stop_token_ids = [eos, eot]
    ids = torch.tensor([[5, 6, eot, eos, eos], [eos, 5, 6, 7, 8], [5, 6, 7, 8, 9]])
    expected = {
        "through_eos": [[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]],
        "through_stop": [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]],
        "before_eos": [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]],
        "all": [[1] * 5] * 3,
    }
    for rule, mask in expected.items():
        assert policy.response_mask(ids, rule).tolist() == mask, rule
    assert policy.ended(ids).tolist() == [True, True, False]
    defaults = {name: build_config(name, {}).response_mask for name in
                ("d1", "coupled_grpo", "cj_grpo", "tracerl", "spg", "bgpo", "espo", "justgrpo", "mdpo", "dpo",
                 "ebpo", "dtreerpo", "ppo")}
    assert defaults == {"d1": "through_eos", "coupled_grpo": "through_stop", "cj_grpo": "all",
                        "tracerl": "before_eos", "spg": "through_eos", "bgpo": "all", "espo": "all",
                        "justgrpo": "all", "mdpo": "all", "dpo": "through_eos", "ebpo": "through_eos",
                        "dtreerpo": "through_eos", "ppo": "before_eos"}


def test_bgpo_on_a_group_of_unequal_lengths_is_darees_sequence_mean():
    """DARE's BGPO on LLaDA/Dream: an all-ones response mask, so each sequence's loss is spread over the same L
    tokens and the token mean is the mean over sequences. Two rows (EOS after 1 and after 3 tokens), one
    Monte-Carlo sample whose masked tokens carry ℓ (θ) and ℓ_old; by hand: d = Σ_masked ℓ·L/x / L − the same for
    old, ratio 1 + d (A > 0) or e^d (A < 0), PPO clip 0.2, dual clip 3, mean over the two rows. The length-weighted
    form (the project's old through-EOS mask) gives a different number, checked too."""
    buffer = make_buffer([[7, EOS, EOS, EOS], [7, 8, 9, EOS]], rewards=[1.0, 0.0])
    method = algorithm("bgpo", estimator_kwargs={"mc_num": 1})
    assert method.config.response_mask == "all"
    buffer = method.advantages(buffer, 2)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)  # verl's z-score of (1, 0)
    leaf = torch.tensor([[-0.4] * 4, [-1.6] * 4], dtype=torch.float64, requires_grad=True)
    theta = ScriptedPolicy(buffer.completion_ids, lambda masked: leaf)
    old = ScriptedPolicy(buffer.completion_ids, constant([[-0.5] * 4, [-1.5] * 4]))
    method.prepare(old, None, buffer, torch.Generator().manual_seed(3), micro_batch_size=8)
    counts = buffer.columns["noise.counts"][:, 0, 0].tolist()
    loss, _ = method.backward(theta, buffer, 0, 1.0)
    losses = []
    for row, advantage, (new, before) in zip(range(2), (a, -a), ((-0.4, -0.5), (-1.6, -1.5))):
        x = counts[row]
        d = (x * new * 4 / x - x * before * 4 / x) / 4  # each masked token's ℓ weighted L/x, over the padded L
        ratio = 1 + d if advantage > 0 else math.exp(d)
        surrogate = clipped(ratio, advantage, 0.2)
        if advantage < 0:
            surrogate = max(surrogate, 3 * advantage)
        losses.append(-surrogate)
    assert loss == pytest.approx(sum(losses) / 2, abs=1e-6)
    weighted = (2 * losses[0] + 4 * losses[1]) / 6  # Σ |o_i| loss_i / Σ |o_i| up to and including the first EOS
    assert abs(weighted - sum(losses) / 2) > 1e-3


# ------------------------------------------------------------------------------------------ uniform groups


def test_d1_keeps_uniform_groups_in_the_normaliser():
    """d1 (from TRL): a group whose rewards are all equal keeps A = 0 and its tokens stay in Σ mask. Two groups of
    two rows, one token each scored (ℓ = −0.5, ℓ_old = −0.6, ℓ_ref = −0.7), μ = 2, ε = 0.5, β = 0.04: the loss is
    the mean over the 4 tokens of −clip(ρ)·A + β·k3, with A = ±0.5 in the first group and 0 in the second."""
    buffer = make_buffer([[7, EOS], [8, EOS], [7, EOS], [8, EOS]], completion_mask=[[1, 0]] * 4,
                         rewards=[1.0, 0.0, 1.0, 1.0])
    method = algorithm("d1", num_iterations=2, estimator="random_ratio", estimator_kwargs={"t_min": 0.0})
    buffer = method.advantages(buffer, 2)
    assert len(buffer) == 4 and buffer.advantage.tolist() == [0.5, -0.5, 0.0, 0.0]
    old = ScriptedPolicy(buffer.completion_ids, constant([[-0.6, -0.6]] * 4))
    ref = ScriptedPolicy(buffer.completion_ids, constant([[-0.7, -0.7]] * 4))
    method.prepare(old, ref, buffer, torch.Generator().manual_seed(0), micro_batch_size=8)
    theta = ScriptedPolicy(buffer.completion_ids, constant([[-0.5, -0.5]] * 4))
    loss, _ = method.loss(theta, buffer, 1)
    scored = buffer.columns["noise.completion_masked"][:, 1, 0].tolist()  # token 0 masked in iteration 1?
    ratio = math.exp(0.1)
    terms = [-clipped(ratio, adv, 0.5) + 0.04 * (math.exp(-0.2) + 0.2 - 1)
             for adv, on in zip([0.5, -0.5, 0.0, 0.0], scored) if on]
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-6)
    dropped = algorithm("d1", drop_zero_variance_groups=True).advantages(
        make_buffer([[7, EOS]] * 4, rewards=[1.0, 0.0, 1.0, 1.0]), 2)
    assert len(dropped) == 2


# ------------------------------------------------------------------------------- block-causal estimators


def block_by_block_logp(policy, prompt_ids: torch.Tensor, completion: torch.Tensor, noisy: torch.Tensor):
    """[L] log f(o^k | …) written plainly, one forward per block of the model's grid (positions from the first
    prompt token): the input is the clean sequence up to the block's start and the noised tokens of the block;
    nothing after it (a block-causal model never reads later blocks)."""
    clean = torch.cat([prompt_ids, completion])
    noised = torch.cat([prompt_ids, noisy])
    block, start = policy.block_size, len(prompt_ids)
    out = torch.zeros(len(completion), dtype=torch.float64)
    for first in range(0, len(clean), block):
        end = min(first + block, len(clean))
        if end <= start:
            continue
        ids = torch.cat([clean[:first], noised[first:end]])[None]
        log_probs = torch.log_softmax(policy.logits(ids)[0].double(), dim=-1)
        for position in range(max(first, start), end):
            out[position - start] = log_probs[position, clean[position]]
    return out


@pytest.mark.parametrize("estimator, kwargs", [("d1", {"p_mask_prompt": 0.0}), ("random_ratio", {"t_min": 0.3}),
                                               ("elbo", {"mc_num": 2}), ("coupled", {}), ("elbo_pair", {"mc_num": 1}),
                                               ("block", {"block_length": 3, "num_t": 1, "p_mask_clean": 0.0}),
                                               ("quadrature", {"points": 2})])
def test_random_mask_estimators_score_each_noised_block_given_the_clean_blocks_before_it(estimator, kwargs):
    """On a block-causal model (blocks of 4; the prompt's 3 tokens share the first block with the completion's
    first token), every draw of every random-mask estimator equals the block-by-block computation above:
    the noised block conditioned on the clean earlier blocks, as DARE's SDAR actors and block-by-block decoding
    do, not on the noised ones a plain block-causal forward would show it."""
    from dare_gym.core.estimators import make_estimator

    policy = random_tiny(block_size=4, seed=1)
    prompt = torch.tensor(policy.tokenizer("ab\n", add_special_tokens=False)["input_ids"])
    completion = torch.tensor(policy.tokenizer("0123456789", add_special_tokens=False)["input_ids"])
    buffer = make_buffer(completion[None].repeat(2, 1), prompts=[prompt.tolist()] * 2, group_size=2)
    inputs = buffer.model_inputs()
    chosen = make_estimator(estimator, mask_token_id=policy.mask_token_id, **kwargs)
    noise = chosen.sample_noise(inputs, torch.Generator().manual_seed(5))
    scores = chosen.token_logp(policy.logits, inputs, noise)
    plain_differs = False
    for draw in scores.draws:
        for row in range(2):
            noisy = completion.masked_fill(draw.masked[row], policy.mask_token_id)  # this draw's noised input
            expected = block_by_block_logp(policy, prompt, completion, noisy)
            torch.testing.assert_close(draw.logp[row].double(), expected, atol=1e-9, rtol=0)
            plain = torch.log_softmax(policy.logits(torch.cat([prompt, noisy])[None])[0, len(prompt):].double(), -1)
            plain = plain.gather(-1, completion[:, None])[:, 0]
            plain_differs |= not torch.allclose(plain, expected, atol=1e-6)
    assert plain_differs  # the doubled forward is not what a plain block-causal forward gives


# ---------------------------------------------------------------------------------------------------- MDPO


def test_mdpo_trains_on_logits_divided_by_the_rollout_temperature():
    """The official trainer's _get_per_token_logps divides the logits by the rollout's T before the log-softmax.
    Two rows of three tokens, committed at steps 0, 1, 2, T = 0.5, all steps trained, μ = 1: π_old = π_θ, so at
    step t the loss is Σ_masked −A_t·λ_t·conf / #masked with ρ = 1, and its gradient with respect to each logit
    passes through log softmax(l / T), i.e. it is 1/T times the untempered one; both checked by hand."""
    from dare_gym.algorithms.mdpo import ROLLOUT_TEMPERATURE

    buffer = make_buffer([[7, 8, 9], [9, 8, 7]], unmask_step=[[0, 1, 2], [0, 1, 2]])
    buffer.columns[mdpo.STEP_REWARD] = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    buffer.columns[mdpo.STEP_PREDICTION] = buffer.completion_ids[:, None, :].expand(2, 3, 3).clone()
    buffer.columns[mdpo.STEP_CONFIDENCE] = torch.full((2, 3, 3), 0.5)
    buffer.columns[ROLLOUT_TEMPERATURE] = torch.tensor([0.5, 0.5])
    method = algorithm("mdpo", train_steps=3)
    buffer = method.advantages(buffer, 2)
    leaf = torch.full((2, 3), -1.0, dtype=torch.float64, requires_grad=True)
    policy = ScriptedPolicy(buffer.completion_ids, lambda masked: leaf)
    method.prepare(policy, None, buffer, None, micro_batch_size=8)
    loss, _ = method.loss(policy, buffer, 0)
    loss.backward()
    advantages = buffer.columns[mdpo.STEP_ADVANTAGE]
    expected, gradient = 0.0, torch.zeros(2, 3, dtype=torch.float64)
    # the scripted logits: the target's logit is v = −1, the other 11 share log(1 − e^v) − log 11; tempered at
    # T = 0.5 the target's log-prob is l_T = v/T − logsumexp(all logits / T), and d l_T / d v by hand:
    v, others = -1.0, math.log(1 - math.exp(-1.0)) - math.log(11)
    z = math.exp(v / 0.5) + 11 * math.exp(others / 0.5)
    p_target = math.exp(v / 0.5) / z
    d_others_dv = -math.exp(v) / (1 - math.exp(v))  # each other logit moves with v to keep the mass at 1
    dl_dv = (1 - p_target) / 0.5 - 11 * (math.exp(others / 0.5) / z) * d_others_dv / 0.5
    for t in range(3):
        masked = list(range(t, 3))
        lam = 3 / (len(masked) + 1e-4)
        for i in range(2):
            for k in masked:
                expected += -advantages[i, t].item() * lam * 0.5 / (2 * len(masked)) / 3
                gradient[i, k] += -advantages[i, t].item() * lam * 0.5 / (2 * len(masked)) / 3 * dl_dv
    assert loss.item() == pytest.approx(expected, abs=1e-9)
    torch.testing.assert_close(leaf.grad, gradient, atol=1e-9, rtol=0)


@torch.no_grad()
def test_mdpo_rollouts_commit_and_record_by_the_tempered_confidence():
    """The official MDPO sampler draws x̂₀ from softmax(logits / T), records p_T(x̂₀) and commits the most
    probable under that same tempered distribution. Replayed here step by step from the recorded guesses: at
    each step the committed positions are the masked ones with the largest recorded p_T, and p_T is computed
    from the model's logits by hand."""
    from dare_gym.algorithms.mdpo import MDPO

    policy = random_tiny(seed=2)
    out = policy.generate(["hey"], seed=0, gen_length=8, steps=8, block_length=8, temperature=0.5,
                          record_predictions=True, **MDPO.rollout_settings)[0]
    prompt = out.prompt_ids[None]
    for step in range(out.step_predictions.shape[0]):
        state = out.completion_ids.masked_fill(out.unmask_step >= step, policy.mask_token_id)
        logits = policy.logits(torch.cat([prompt, state[None]], dim=1))[0, prompt.shape[1]:].double()
        guess = out.step_predictions[step]
        masked = state == policy.mask_token_id
        p_tempered = torch.softmax(logits / 0.5, dim=-1).gather(-1, guess[:, None])[:, 0]
        torch.testing.assert_close(out.step_confidence[step][masked].double(), p_tempered[masked], atol=1e-6, rtol=0)
        committed = (out.unmask_step == step) & masked
        assert int(committed.sum()) == 1
        best = int(torch.where(masked, p_tempered, torch.tensor(-1.0, dtype=torch.float64)).argmax())
        assert bool(committed[best])


# ------------------------------------------------------------------------------------------------- TraceRL


def test_tracerl_normalises_block_rows_by_the_longest_response_and_filters_groups():
    """rl_sdar.py: each (rollout, step) row's Σ_targets(−s + β·k3) / L₁ with L₁ the longest response of the step's
    batch, then the mean over rows. Two groups of two rows; responses of 1, 3, 2, 2 tokens before the EOS
    (TraceRL drops the EOS: ``before_eos``), every token decoded at step 0 except the third row's last (step 1).
    Group 2 is all correct (accuracy 1 > 0.8) and is dropped; of group 1, row 2 never ended, so it counts as
    wrong: rewards (1, 0) → A = ±1 (population std, no epsilon). With μ = 1, ρ = 1 and the KL is 0."""
    buffer = make_buffer([[7, EOS, EOS, EOS], [7, 8, 9, 7], [7, 8, EOS, EOS], [8, 9, EOS, EOS]],
                         completion_mask=[[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]],
                         unmask_step=[[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]],
                         rewards=[1.0, 1.0, 1.0, 1.0])
    buffer.columns[CORRECT] = torch.tensor([True, True, True, True])
    buffer.columns[ENDED] = torch.tensor([True, False, True, True])
    method = algorithm("tracerl")
    buffer = method.advantages(buffer, 2)
    assert len(buffer) == 2 and buffer.reward.tolist() == [1.0, 0.0] and buffer.advantage.tolist() == [1.0, -1.0]
    policy = ScriptedPolicy(buffer.completion_ids, constant([[-0.5] * 4, [-0.5] * 4]), block_size=2)
    method.prepare(policy, None, buffer, None, micro_batch_size=8)
    loss, metrics = method.loss(policy, buffer, 0)
    longest = 4  # row 2's four tokens (the dropped group's rows do not count)
    rows = [-1.0 * 1 / longest,            # row 1, step 0: one target, −A·ρ = −1
            +1.0 * 2 / longest,            # row 2, step 0: tokens 1–2, −(−1)·ρ each
            +1.0 * 2 / longest]            # row 2, step 1: tokens 3–4
    assert metrics["rows"] == 3
    assert loss.item() == pytest.approx(sum(rows) / 3, abs=1e-9)


# ----------------------------------------------------------------------------------------------- d-TreeRPO


def test_dtreerpo_official_schedule_trains_each_parent_position_for_mu_steps():
    """Official: a minibatch is one parent position's children in every tree, trained for μ consecutive
    optimizer steps; every position once per tree search. Two trees with fan-out [2, 2]: positions 0 (the root:
    2 children per tree) and 1, 2 (its children: 2 each); μ = 3 gives 9 optimizer steps, three consecutive per
    position, each holding that position's rows of both trees and nothing else."""
    from dare_gym.algorithms.dtreerpo import parent_positions

    parent = torch.tensor([0, 0, 2, 2, 3, 3, 1, 1, 4, 4, 5, 5])  # tree 0: root 0, nodes 2, 3; tree 1: root 1, 4, 5
    node = torch.tensor([2, 3, 6, 7, 8, 9, 4, 5, 10, 11, 12, 13])
    tree = torch.tensor([0] * 6 + [1] * 6)
    buffer = make_buffer([[7, 8]] * 12, rewards=[0.0] * 12)
    buffer.group_id = parent
    buffer.columns.update(parent=parent, node=node, tree=tree)
    assert parent_positions(buffer).tolist() == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]
    method = algorithm("dtreerpo", num_iterations=3)
    plan = [(iteration, [m.columns["node"].tolist() for m in minibatches])
            for iteration, minibatches in method.update_plan(buffer, 64, torch.Generator().manual_seed(0))]
    assert [iteration for iteration, _ in plan] == [0, 1, 2] * 3
    for start in (0, 3, 6):
        steps = [sorted(sum(batches, [])) for _, batches in plan[start:start + 3]]
        assert steps[0] == steps[1] == steps[2]
        positions = {int(parent_positions(buffer)[(node == n).nonzero()[0, 0]]) for n in steps[0]}
        assert len(positions) == 1 and len(steps[0]) == 4  # one position, its children in both trees
    everything = algorithm("dtreerpo", num_iterations=3, update_schedule="all_segments")
    assert len(list(everything.update_plan(buffer, 64, torch.Generator().manual_seed(0)))) == 3


# ------------------------------------------------------------------------------------------ SDAR decoding


def test_block_diffusion_takes_the_nucleus_of_the_tempered_distribution():
    """SDAR: logits / T first, then top-p. Logits (2, 1, 0, −10): at T = 1 the probabilities are (0.665, 0.245,
    0.090, ·) and top-p 0.8 keeps the first two; at T = 0.5 they are (0.867, 0.117, 0.016, ·) and it keeps one.
    Filtering before tempering would keep two at both temperatures."""
    from dare_gym.samplers.block_diffusion import filter_logits

    logits = torch.tensor([[2.0, 1.0, 0.0, -10.0]], dtype=torch.float64)
    for temperature, kept in ((1.0, 2), (0.5, 1)):
        probabilities = torch.softmax(logits / temperature, dim=-1)[0].tolist()
        by_hand = next(n for n in range(1, 5) if sum(probabilities[:n]) >= 0.8)
        assert by_hand == kept
        assert int(torch.isfinite(filter_logits(logits / temperature, 0, 0.8)).sum()) == kept


def test_entropy_bounded_commits_the_lowest_entropies_while_their_sum_stays_below_the_bound():
    """SDAR's eb sampler: sort the masked positions by entropy, commit as many as keep the running sum < γ (at
    least one). Entropies (0.30, 0.05, inf (not masked), 0.20, 0.01) with γ = 0.35: ascending 0.01, 0.05, 0.20
    (sum 0.26 < 0.35), then 0.30 (0.56): commit positions 4, 1, 3. With γ = 0.001: only the lowest, position 4."""
    from dare_gym.samplers.block_diffusion import entropy_bounded

    entropy = torch.tensor([[0.30, 0.05, float("inf"), 0.20, 0.01]], dtype=torch.float64)
    assert entropy_bounded(entropy, 0.35).tolist() == [[False, True, False, True, True]]
    assert entropy_bounded(entropy, 0.001).tolist() == [[False, False, False, False, True]]


@torch.no_grad()
def test_block_diffusion_entropy_bounded_decodes_as_written_by_hand():
    """One row on a random block-causal model, greedy, entropy_bounded with γ = 0.6: a plain decode that at each
    step recomputes everything so far, takes each masked position of the current block's entropy of softmax(logits)
    (the mask token excluded) and commits the lowest-entropy ones while their running sum stays below γ."""
    policy = random_tiny(block_size=4, seed=4)
    prompt = policy.tokenizer("ab\n", add_special_tokens=False)["input_ids"]
    gen_length, mask_id = 9, policy.mask_token_id
    x = prompt + [mask_id] * gen_length
    for first in range(0, len(x), 4):
        end = min(first + 4, len(x))
        while any(x[i] == mask_id for i in range(first, end)):
            logits = policy.logits(torch.tensor([x[:end]]))[0].double()
            logits[:, mask_id] = float("-inf")
            probabilities = torch.softmax(logits, dim=-1)
            entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-300))).sum(dim=-1)
            masked = sorted((float(entropy[i]), i) for i in range(first, end) if x[i] == mask_id)
            total, chosen = 0.0, []
            for value, i in masked:
                if chosen and total + value >= 0.6:
                    break
                total += value
                chosen.append(i)
            for i in chosen:
                x[i] = int(probabilities[i].argmax())
    out = policy.generate(["ab\n"], sampler="block_diffusion", gen_length=gen_length, steps_per_block=4,
                          remasking_strategy="entropy_bounded", eb_threshold=0.6, temperature=0.0, early_exit=False)
    assert out[0].completion_ids.tolist() == x[len(prompt):]
