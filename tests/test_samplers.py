"""The sampler interface: Fast-dLLM's caches and commit rules, exact block-diffusion decoding, and what every
sampler records (unmask_step, commit log-probs, counts of model calls and tokens)."""

from __future__ import annotations

import pytest
import torch

import dare_gym
import dare_gym.models
from dare_gym.core.policy import DiffusionPolicy
from dare_gym.samplers import SAMPLERS, make_options
from dare_gym.samplers.block_diffusion import commit_by_rule, filter_logits
from dare_gym.samplers.fast_dllm import FactorCommit, ThresholdCommit
from helpers import random_tiny

PROMPTS = ["sort 583920\n", "hi", "a much longer prompt, with spaces!\n", "q: 2+2=?\n"]


def random_policy(seed: int = 0, block_size: int | None = None) -> DiffusionPolicy:
    """A random tiny dLLM in float64 (batching cannot flip a near-tie)."""
    return random_tiny(block_size, seed, hidden_size=64)


def _ids(completions):
    return [c.completion_ids.tolist() for c in completions]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_fast_dllm_with_everything_off_is_the_llada_sampler(temperature):
    policy = random_policy()
    settings = dict(gen_length=16, steps=8, block_length=4, temperature=temperature)
    llada = policy.generate(PROMPTS, sampler="llada", seed=3, **settings)
    fast = policy.generate(PROMPTS, sampler="fast_dllm", cache="none", threshold=None, early_exit=False, seed=3,
                           **settings)
    assert _ids(fast) == _ids(llada)
    assert [c.unmask_step.tolist() for c in fast] == [c.unmask_step.tolist() for c in llada]


def test_threshold_and_factor_rules_on_the_worked_numbers():
    confidence = torch.tensor([[0.95, 0.92, 0.5, 0.3], [0.95, 0.92, 0.9, 0.3], [0.4, 0.3, float("-inf"), 0.2]],
                              dtype=torch.float64)
    threshold = ThresholdCommit(0.9)(confidence, torch.ones(3, dtype=torch.long))
    assert threshold.sum(dim=1).tolist() == [2, 3, 1]  # (0.95, 0.92); (0.95, 0.92, 0.9); below τ: the top one
    assert threshold[2].tolist() == [True, False, False, False]
    factor = FactorCommit(1.0)(confidence, torch.ones(3, dtype=torch.long))
    # τ_n = 1 − 1/(n+1): (−1, 0.667, 0.75, 0.8). Row 2: 0.3 fails τ₄, so 3 (the official code's quirk would say 4)
    assert factor.sum(dim=1).tolist() == [2, 3, 1]


def test_block_remasking_rules():
    confidence = torch.tensor([[0.5, 0.95, 0.97, float("-inf"), 0.2]], dtype=torch.float64)
    two = torch.tensor([2])
    assert commit_by_rule("low_confidence_static", confidence, two, 0.9).nonzero()[:, 1].tolist() == [1, 2]
    assert commit_by_rule("sequential", confidence, two, 0.9).nonzero()[:, 1].tolist() == [0, 1]
    assert commit_by_rule("low_confidence_dynamic", confidence, torch.tensor([1]), 0.9).nonzero()[:, 1].tolist() == [1, 2]
    assert commit_by_rule("low_confidence_dynamic", confidence, torch.tensor([3]), 0.9).nonzero()[:, 1].tolist() == [0, 1, 2]


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, 2, 1.0)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, 0, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, 0, 0.4)).tolist() == [[True, False, False, False]]


def _accuracy(env, completions) -> float:
    correct = 0
    for index, completion in enumerate(completions):
        env.reset(options={"index": index})
        correct += env.step(completion.text)[4]["correct"]
    return correct / len(completions)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_caches_cut_the_tokens_processed_and_keep_the_trained_model_accurate(cache):
    policy = dare_gym.load_policy("tiny")
    env = dare_gym.make("digitsort-v0", split="test")
    prompts = [env.reset(options={"index": i})[0] for i in range(100)]
    settings = dict(gen_length=8, steps=8, block_length=4, temperature=0.0)
    reference, base = policy.generate(prompts, sampler="llada", return_stats=True, **settings)
    fast, stats = policy.generate(prompts, sampler="fast_dllm", cache=cache, threshold=None, early_exit=False,
                                  return_stats=True, **settings)
    assert stats["model_calls"] == base["model_calls"]
    assert stats["tokens_processed"] < 0.6 * base["tokens_processed"]
    # approximate caches change some completions of a partly trained model, not its accuracy
    assert abs(_accuracy(env, fast) - _accuracy(env, reference)) <= 0.05


class ScriptedPolicy:
    """What a sampler needs of a policy, with a model that is sure of a fixed script: completion position j
    predicts ``script[j]`` with probability ~0.99 (the stop token 2 ends the answer)."""

    family, block_size, mask_token_id, stop_token_ids, vocab = dare_gym.models.get_family("tiny"), None, 3, [2], 16

    def __init__(self, script, prompt_length):
        self.script, self.prompt_length = script, prompt_length

    def logits(self, input_ids, attention_mask=None, *, cache=None, logits_to_keep=0, position_ids=None):
        logits = torch.zeros(*input_ids.shape, self.vocab, dtype=torch.float64)
        for j, token in enumerate(self.script):
            logits[:, self.prompt_length + j, token] = 10.0
        return logits[:, -logits_to_keep:] if logits_to_keep else logits


def test_threshold_decoding_and_early_exit_cut_model_calls():
    script = [7, 8, 9, 2] + [2] * 12  # three answer tokens, then the stop token
    policy = ScriptedPolicy(script, prompt_length=2)
    prompt, mask = torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long)
    settings = dict(gen_length=16, steps=16, block_length=4, temperature=0.0)

    def run(name, **options):
        return SAMPLERS[name](policy, prompt.clone(), mask, make_options(name, {**settings, **options}))

    llada = run("llada")
    parallel = run("fast_dllm", cache="none", threshold=0.9, early_exit=False)
    early = run("fast_dllm", cache="none", threshold=0.9, early_exit=True)
    assert llada.completion_ids.tolist() == parallel.completion_ids.tolist() == early.completion_ids.tolist() == [script]
    assert (llada.model_calls, parallel.model_calls, early.model_calls) == (16, 4, 1)  # 1 step per sure block
    assert early.unmask_step.tolist() == [[0] * 16]  # the rest is filled with the stop token at the exit step


@torch.no_grad()
def reference_block_decode(policy, prompt: list[int], gen_length: int, steps_per_block: int) -> list[int]:
    """Block diffusion for one unpadded row, written plainly: the row's blocks on the model grid (positions
    from 0), a full forward over everything so far at every step, static low-confidence commits of SDAR's
    schedule (the block size spread over the steps, remainder first; a partial block runs out early)."""
    block, mask_id = policy.block_size, policy.mask_token_id
    x = prompt + [mask_id] * gen_length
    first = len(prompt) // block
    for index in range(first, (len(x) - 1) // block + 1):
        start, end = max(index * block, len(prompt)), min((index + 1) * block, len(x))
        schedule = [block // steps_per_block + (1 if s < block % steps_per_block else 0) for s in range(steps_per_block)]
        for step in range(steps_per_block):
            logits = policy.logits(torch.tensor([x[:end]]))[0].double()
            logits[:, mask_id] = float("-inf")
            probability = torch.softmax(logits, dim=-1)
            best = probability.max(dim=-1)
            candidates = [i for i in range(start, end) if x[i] == mask_id]
            chosen = sorted(candidates, key=lambda i: -float(best.values[i]))[: schedule[step]]
            for i in chosen:
                x[i] = int(best.indices[i])
    return x[len(prompt):]


@pytest.mark.parametrize("gen_length, steps_per_block", [(12, 4), (9, 2), (8, 1)])
def test_block_diffusion_is_exact_batched_and_cached(gen_length, steps_per_block):
    policy = random_policy(1, block_size=4)
    out, stats = policy.generate(PROMPTS, sampler="block_diffusion", gen_length=gen_length,
                                 steps_per_block=steps_per_block, remasking_strategy="low_confidence_static",
                                 temperature=0.0, early_exit=False, return_stats=True)
    for prompt, completion in zip(PROMPTS, out):
        ids = policy.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert completion.completion_ids.tolist() == reference_block_decode(policy, ids, gen_length, steps_per_block)
    # only columns after the cache are fed: far fewer tokens than a full forward per call
    longest = max(len(policy.tokenizer(p)["input_ids"]) for p in PROMPTS) + gen_length
    assert stats["tokens_processed"] < 0.6 * stats["model_calls"] * len(PROMPTS) * longest


def test_commit_logp_equals_a_full_forward_without_a_cache_and_differs_with_one():
    """The rollout/train mismatch: what the committing forward gave a token, against a full forward on the
    state before that step (what trajectory replay scores)."""
    policy = random_policy(2)
    settings = dict(gen_length=8, steps=8, block_length=4, temperature=1.0, seed=0)

    @torch.no_grad()
    def replay_gap(completions):
        gaps = []
        for prompt, completion in zip(PROMPTS, completions):
            ids = torch.tensor([policy.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            for step in completion.unmask_step.unique().tolist():
                state = completion.completion_ids.masked_fill(completion.unmask_step >= step, policy.mask_token_id)
                logits = policy.logits(torch.cat([ids, state[None]], dim=1))[0, ids.shape[1]:].double()
                logp = torch.log_softmax(logits, -1).gather(-1, completion.completion_ids[:, None]).squeeze(-1)
                here = completion.unmask_step == step
                gaps.append((logp[here] - completion.commit_logp[here].double()).abs())
        return float(torch.cat(gaps).mean())

    exact = policy.generate(PROMPTS, sampler="llada", **settings)
    assert replay_gap(exact) < 1e-5
    cached = policy.generate(PROMPTS, sampler="fast_dllm", cache="dual", threshold=None, early_exit=False, **settings)
    assert replay_gap(cached) > 1e-3


def test_sampler_options_are_validated_by_name():
    with pytest.raises(ValueError, match="no option.*thresold"):
        make_options("fast_dllm", {"thresold": 0.9})
    with pytest.raises(ValueError, match="cache must be one of"):
        make_options("fast_dllm", {"cache": "triple"})
    with pytest.raises(ValueError, match="unknown sampler 'fastest'.*block_diffusion"):
        random_policy().generate(["x"], sampler="fastest")
    with pytest.raises(ValueError, match="block-causal.*block_diffusion"):
        random_policy(block_size=4).generate(["x"], sampler="fast_dllm", gen_length=4, steps=4, block_length=4)
    with pytest.raises(ValueError, match="full attention"):
        random_policy().generate(["x"], sampler="block_diffusion", gen_length=4)
    assert set(SAMPLERS) >= {"llada", "fast_dllm", "block_diffusion"}
