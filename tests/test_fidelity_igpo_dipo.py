"""IGPO's and DiPO's whole losses against independent computations from their official code's formulas.

Every expected number is written out here (plain Python over log-probs from plain forwards), never taken from the
function under test; the algorithm runs through its real path (``advantages`` → ``prepare`` → ``loss``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dare_gym.algorithms import build_config, make_algorithm
from dare_gym.algorithms.dipo import block_rounds
from dare_gym.core.policy import DiffusionPolicy
from dare_gym.models.tiny import TinyDLLMConfig, TinyDLLMForMaskedLM
from dare_gym.models.tokenizer import build_char_tokenizer
from helpers import make_buffer


def random_tiny(block_size: int | None = None, seed: int = 0) -> DiffusionPolicy:
    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    config = TinyDLLMConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, initializer_range=0.5, mask_token_id=tokenizer.mask_token_id,
                            block_size=block_size)
    return DiffusionPolicy(TinyDLLMForMaskedLM(config).double().eval(), tokenizer, family="tiny")


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
    loss, metrics = method.loss(policy, buffer, 0)

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
    assert "this tiny model (its config sets no block size)" in dipo.model_refusal(tiny, policy_config("tiny"))
    assert dipo.model_refusal(tiny, policy_config("tiny-block")) is None
