"""IGPO's and DiPO's whole losses against independent computations from their official code's formulas.

Every expected number is written out here (plain Python over log-probs from plain forwards), never taken from the
function under test; the algorithm runs through its real path (``advantages`` → ``prepare`` → ``loss``).
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from dare_gym.algorithms import build_config, make_algorithm
from dare_gym.algorithms.dipo import block_rounds
from dare_gym.algorithms.igpo import HINTED, IGPOConfig, inpainting_prefill, stretched_positions
from dare_gym.core.policy import DiffusionPolicy
from helpers import random_tiny, MASK, VOCAB, ScriptedPolicy, constant, make_buffer


def perturb(policy: DiffusionPolicy, seed: int, scale: float = 0.05) -> None:
    """Move every weight a little: the policy after an update, so that ρ ≠ 1 and the clip can act."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in policy.model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def block_by_block_logp(policy, prompt: torch.Tensor, completion: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    """[L] log f(completion | noisy state), one plain forward per block of the model's grid (positions from the
    first prompt token): the clean sequence before the block, the noisy tokens of the block, nothing after it."""
    clean, noised = torch.cat([prompt, completion]), torch.cat([prompt, noisy])
    block, start = policy.block_size, len(prompt)
    out = torch.zeros(len(completion), dtype=torch.float64)
    with torch.no_grad():
        for first in range(0, len(clean), block):
            end = min(first + block, len(clean))
            if end <= start:
                continue
            log_probs = torch.log_softmax(policy.logits(torch.cat([clean[:first], noised[first:end]])[None])[0], -1)
            for position in range(max(first, start), end):
                out[position - start] = log_probs[position, clean[position]]
    return out


# ---------------------------------------------------------------------------------------------------- DiPO


def test_dipo_rounds_are_the_rank_of_each_commit_step_within_its_block():
    """Row 0: prompt of 3 tokens, so completion positions 0 | 1–4 | 5–7 fall in blocks 0 | 1 | 2 (of 4); row 1:
    prompt of 2, blocks 0–1 | 2–5 | 6–7, and its response ends at position 4."""
    steps = torch.tensor([[0, 1, 1, 2, 3, 4, 5, 4], [0, 2, 1, 1, 1, 3, 3, 3]])
    response = torch.tensor([[1] * 8, [1] * 5 + [0] * 3]).bool()
    rounds = block_rounds(steps, response, torch.tensor([3, 2]), 4)
    assert rounds.tolist() == [[0, 0, 0, 1, 2, 0, 1, 0], [0, 1, 0, 0, 0, -1, -1, -1]]


def test_dipo_loss_is_the_mean_per_round_row_over_block_size_rows_per_response():
    """modeling_sdar.py's compute_rl_loss and grpo.py's rows, by hand: each (response, round) row scores its
    targets in the state before that step of each block (later commits and everything after the response
    masked; earlier blocks clean), ℓ = mean_targets[−min(ρA, clip(ρ, 0.8, 1.28)A) + β·k3], and the rows' sum is
    divided by N · block_size. The group's rewards (1, 0) give A = ±1 (population std). The policy moves between
    prepare (π_old = π_ref) and the loss, so ρ ≠ 1."""
    policy = random_tiny(block_size=4, seed=3)
    tok = policy.tokenizer
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tok.eos_token_id
    prompts = [ids("ab\n"), ids("c\n")]
    completions = [ids("01234567"), ids("7654") + [eos] * 4]
    steps = [[0, 1, 1, 2, 3, 4, 5, 4], [0, 2, 1, 1, 1, 3, 3, 3]]
    rounds = [[0, 0, 0, 1, 2, 0, 1, 0], [0, 1, 0, 0, 0, -1, -1, -1]]  # the test above
    buffer = make_buffer(completions, completion_mask=[[1] * 8, [1] * 5 + [0] * 3], unmask_step=steps,
                         rewards=[1.0, 0.0], prompts=prompts)
    beta = 0.5
    # μ = 2: π_old is scored in prepare (with μ = 1 it is π_θ detached, as the official code skips it then)
    method = make_algorithm("dipo", build_config("dipo", {"beta": beta, "num_iterations": 2}),
                            mask_token_id=policy.mask_token_id)
    buffer = method.advantages(buffer, 2)
    assert buffer.advantage.tolist() == [1.0, -1.0]
    reference = copy.deepcopy(policy)
    method.prepare(policy, reference, buffer, None, micro_batch_size=8)

    def round_logps(model) -> list[dict[int, torch.Tensor]]:
        """Per row, per round: the [L] log-probs of the completion in that round's state."""
        out = []
        for row in range(2):
            completion, order = torch.tensor(completions[row]), torch.tensor(rounds[row])
            out.append({r: block_by_block_logp(model, torch.tensor(prompts[row]), completion,
                                               completion.masked_fill((order >= r) | (order < 0), policy.mask_token_id))
                        for r in range(int(order.max()) + 1)})
        return out

    old = round_logps(policy)
    perturb(policy, seed=11)
    new = round_logps(policy)
    loss, metrics = method.loss(policy, buffer, 1)  # iteration 0 would be on-policy (ρ = 1)

    total, ratios = 0.0, []
    for row, advantage in enumerate([1.0, -1.0]):
        for r, logp in new[row].items():
            terms = []
            for k, token_round in enumerate(rounds[row]):
                if token_round != r:
                    continue
                log_ratio = float(logp[k] - old[row][r][k])
                ratio = math.exp(log_ratio)
                ratios.append(ratio)
                clip = min(max(ratio, 0.8), 1.28)
                u = float(old[row][r][k] - logp[k])  # log π_ref − log π_θ, π_ref = π_old
                terms.append(-min(ratio * advantage, clip * advantage) + beta * (math.exp(u) - 1 - u))
            total += sum(terms) / len(terms)
    expected = total / (2 * 4)
    assert metrics["rounds"] == 3
    assert min(ratios) < 0.8 and max(ratios) > 1.28  # the update moved ratios past both clip bounds
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_dipo_is_refused_on_full_attention_families_with_its_reason():
    from dare_gym.algorithms import get_algorithm
    from dare_gym.core.loading import policy_config, policy_family
    from dare_gym.models.families import get_family

    dipo = get_algorithm("dipo").algorithm_class
    for name in ("llada", "dream"):
        assert "needs block-causal attention" in dipo.refusal(get_family(name))
    for name in ("sdar", "llada2", "tiny"):
        assert dipo.refusal(get_family(name)) is None
    tiny = policy_family("tiny")
    assert "this tiny model has full attention (its config sets no block size)" in \
        dipo.model_refusal(tiny, policy_config("tiny"))
    assert dipo.model_refusal(tiny, policy_config("tiny-block")) is None


# ---------------------------------------------------------------------------------------------------- IGPO


def test_igpo_places_revealed_chunks_at_stretched_positions():
    """scale_chunk_positions by hand: chunks (0,2), (5,7), (9,10), stretch 1.5, gaps capped at 2, room 9: the
    first at ⌊0·1.5⌋ = 0; the next after a gap of min(⌊3·1.5⌋, 2) = 2 -> (4, 6); the last after min(⌊2·1.5⌋, 2)
    = 2 -> (8, 9), cut at the room's end."""
    assert stretched_positions([(0, 2), (5, 7), (9, 10)], 1.5, 2, 9) == [(0, 2), (4, 6), (8, 9)]
    assert stretched_positions([(0, 2), (5, 7)], 1.5, 100, 5) == [(0, 2)]  # the second would start at 6 > 5


def test_igpo_prefill_reveals_a_fraction_of_the_hint_chunks_and_always_the_last():
    """A 10-token hint, chunks of exactly 2, a 20-token completion with its last 5 free: room 15, stretch
    min(1.5, 15/10) = 1.5. η = 0 hides ⌊5·1⌋ = 5 chunks, but the last is always revealed: tokens 8–9 at
    ⌊8·1.5⌋ = 12. η = 1 hides none: chunks back to back from position 0 (no gaps to stretch)."""
    config = IGPOConfig(min_chunk_size=2, max_chunk_size=2, free_tail=5)
    hint = list(range(20, 30))
    none = inpainting_prefill(hint, 0.0, 20, MASK, config, random.Random(0))
    expected = [MASK] * 20
    expected[12:14] = [28, 29]
    assert none.tolist() == expected
    every = inpainting_prefill(hint, 1.0, 20, MASK, config, random.Random(0))
    assert every.tolist() == hint + [MASK] * 10
    counts = set()
    for seed in range(20):  # η = 0.5 hides ⌊5·0.5⌋ = 2 chunks: 3 show, or 4 when the last was hidden (it shows)
        half = inpainting_prefill(hint, 0.5, 20, MASK, config, random.Random(seed)).tolist()
        revealed = [token for token in half if token != MASK]
        assert revealed[-2:] == [28, 29] and len(revealed) in (6, 8)
        counts.add(len(revealed))
    assert counts == {6, 8}
    long_hint = list(range(40, 80))  # longer than the room: cut to 15 tokens (7 chunks of 2, the 15th dropped)
    assert inpainting_prefill(long_hint, 1.0, 20, MASK, config, random.Random(0)).tolist() == \
        long_hint[:14] + [MASK] * 6


def scripted_entropy(logp: float) -> float:
    """The entropy of ScriptedPolicy's distribution: p = e^v on the target, the rest spread over VOCAB − 1 ids."""
    p = math.exp(logp)
    return -p * logp - (1 - p) * math.log((1 - p) / (VOCAB - 1))


def test_igpo_loss_scores_generated_tokens_and_the_highest_entropy_hinted_ones_with_the_sequence_ratio():
    """compute_loss of trainer_igpo.py by hand, on one group of two rows of four tokens, rewards (1, 0): A = ±0.5
    (no std). Row 0's positions 1–3 were inpainted; of them max(1, ⌊3·0.2⌋) = 1 is scored, the one with the
    highest entropy under π_old (position 1, the least confident). The ratio is GSPO's: s_i = exp(mean over
    all four positions of log π_θ − log π_old), clipped to [0.8, 1.2]; row 0's (1.87 with A > 0) is clipped,
    row 1's (1.78 with A < 0) is not. ℓ = −min(sA, clip(s)A) + β·k3(π_θ‖π_ref) per token, averaged over the six
    scored tokens. The gradient reaches every position of row 1 through the mean (1/4 of −A·s per scored token),
    not only its scored ones."""
    old = [[-0.5, -2.0, -0.7, -1.2], [-1.0, -1.5, -0.3, -0.9]]
    new = [[-0.1, -1.0, -0.3, -0.5], [-0.2, -0.8, -0.1, -0.3]]
    ref = [[-0.6, -2.1, -0.6, -1.1], [-0.9, -1.4, -0.2, -1.0]]
    beta, advantages = 0.1, [0.5, -0.5]
    buffer = make_buffer([[5, 6, 7, 8], [6, 7, 8, 5]], rewards=[1.0, 0.0])
    buffer.columns[HINTED] = torch.tensor([[False, True, True, True], [False] * 4])
    method = make_algorithm("igpo", build_config("igpo", {"beta": beta, "num_iterations": 2}), mask_token_id=MASK)
    buffer = method.advantages(buffer, 2)
    assert buffer.advantage.tolist() == advantages
    targets = buffer.completion_ids
    method.prepare(ScriptedPolicy(targets, constant(old)), ScriptedPolicy(targets, constant(ref)), buffer, None,
                   micro_batch_size=8)
    assert scripted_entropy(-2.0) > max(scripted_entropy(-0.7), scripted_entropy(-1.2))
    leaf = torch.tensor(new, dtype=torch.float64, requires_grad=True)
    # iteration 1: iteration 0 is on-policy (π_old there is π_θ detached), this one reads π_old's scores
    loss, metrics = method.loss(ScriptedPolicy(targets, lambda masked: leaf), buffer, 1)
    loss.backward()

    scored = [[0, 1], [0, 1, 2, 3]]
    total, grad = 0.0, [[0.0] * 4 for _ in range(2)]
    for row, advantage in enumerate(advantages):
        s = math.exp(sum(n - o for n, o in zip(new[row], old[row])) / 4)
        clip = min(max(s, 0.8), 1.2)
        surrogate_clipped = clip * advantage < s * advantage
        for t in scored[row]:
            u = ref[row][t] - new[row][t]
            total += -min(s * advantage, clip * advantage) + beta * (math.exp(u) - u - 1)
            grad[row][t] += beta * (1 - math.exp(u)) / 6
            if not surrogate_clipped:  # d(−sA)/d new_t' = −A·s/4 for every position t' of the row
                for position in range(4):
                    grad[row][position] += -advantage * s / 4 / 6
        assert surrogate_clipped == (row == 0)
    assert metrics["scored_tokens"] == 6
    assert loss.item() == pytest.approx(total / 6, rel=1e-12)
    torch.testing.assert_close(leaf.grad, torch.tensor(grad, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_igpo_rollout_replaces_rows_of_an_all_wrong_group_with_correct_inpainted_ones(tiny_policy):
    """Two groups of 6 on digit sorting. The judge calls group 0's first sampling all wrong (as if the model had
    failed it) and group 1's right; afterwards it is the env's own verdict. Group 0 is regenerated with chunks of
    the gold answer inpainted (free_tail 0, chunks of 2, η ∈ [0.5, 0.5]: 2 of 3 chunks, the last always), its
    correct regenerations (at most max_replacements = 2) replace its first rows, whose hinted positions hold the
    gold tokens and are recorded; group 1 is left alone."""
    from dare_gym.algorithms.base import RolloutContext
    import dare_gym

    env = dare_gym.make("digitsort-v0")
    indices = [11] * 6 + [12] * 6
    prompts = [env.prompt(env.record(i)) for i in indices]
    calls = []

    def judge(index, texts):
        calls.append(index)
        if len(calls) <= 2:  # the first sampling of each group
            return [index == 12] * len(texts)
        return [env.is_correct(text, env.record(index)) for text in texts]

    context = RolloutContext(indices=indices, score_texts=None, demonstrations=None,
                             hints=lambda rows, fraction: [env.hint(env.record(i), fraction) for i in rows],
                             judge=judge)
    method = make_algorithm("igpo", build_config("igpo", {
        "free_tail": 0, "min_chunk_size": 2, "max_chunk_size": 2, "inpaint_ratio_low": 0.5,
        "inpaint_ratio_high": 0.5, "max_replacements": 2}), mask_token_id=tiny_policy.mask_token_id)
    settings = dict(gen_length=8, steps=8, block_length=8, temperature=0.7)
    generator = torch.Generator().manual_seed(0)
    plain = tiny_policy.generate(prompts, generator=torch.Generator().manual_seed(0), **settings)
    rollout = method.rollout(tiny_policy, prompts, group_size=6, generator=generator, batch_size=64,
                             settings=settings, context=context)
    gold = tiny_policy.tokenizer(env.record(11)["gold"], add_special_tokens=False)["input_ids"]
    assert method.inpainted_groups == 1 and method.replaced_rows == 2  # the tiny model completes hints correctly
    for row in range(2):
        hinted = rollout.hinted[row]
        assert 4 <= int(hinted.sum()) <= 6 and bool(hinted[4:6].all())  # 2 or 3 chunks, always the last (4-5)
        assert rollout.completions[row].completion_ids[hinted].tolist() == torch.tensor(gold)[hinted[:6]].tolist()
        assert (rollout.completions[row].unmask_step[hinted] == -1).all()
        assert env.is_correct(rollout.completions[row].text, env.record(11))
    for row in range(2, 12):  # the other rows are the plain sampling's, unhinted
        assert not rollout.hinted[row].any()
        assert torch.equal(rollout.completions[row].completion_ids, plain[row].completion_ids)
    buffer = rollout.buffer([1.0] * 12, [i // 6 for i in range(12)])
    assert buffer.columns[HINTED].sum(dim=1).tolist()[:3] == [int(rollout.hinted[0].sum()),
                                                              int(rollout.hinted[1].sum()), 0]
