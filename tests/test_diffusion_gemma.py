"""DiffusionGemma, the uniform-noise family, on transformers' native ``DiffusionGemmaForBlockDiffusion``: loading,
the split forward, the entropy-bound sampler against ``model.generate()``, its trace, the uniform-noise estimators
against enumeration, LoRA over the shared encoder/decoder weights, and algorithms that train it.

The models are real: a random stand-in written through the config classes (``build_standin``), the built-in
``tiny-gemma`` checkpoint (trained by experiments/train_tiny_gemma.py), and a 6-token-vocabulary model small enough
to enumerate every noisy canvas.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math

import numpy as np
import pytest
import torch

import dare_gym
from dare_gym.algorithms import build_config, make_algorithm
from dare_gym.core.buffer import SequenceBatch
from dare_gym.core.loading import policy_family
from dare_gym.models.diffusion_gemma import CHAT_TEMPLATE, build_standin, standin_config
from dare_gym.core.policy import DiffusionPolicy
from dare_gym.samplers import get_sampler, make_options
from dare_gym.samplers.diffusion_gemma import acceptance_steps, entropy_bound_accept
from dare_gym.core.uniform_estimators import (
    UniformCorruption,
    UniformTrajectory,
    corrupt,
    make_noise_estimator,
    uniform_sft_loss,
)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return build_standin(tmp_path_factory.mktemp("diffusion_gemma") / "standin", seed=0)


@pytest.fixture(scope="module")
def standin_policy(standin):
    return dare_gym.load_policy(standin)


@pytest.fixture(scope="module")
def tiny_gemma():
    return dare_gym.load_policy("tiny-gemma")


def _sampler(policy, prompt_ids, prompt_mask, generator, **options):
    return get_sampler("diffusion_gemma")(policy, prompt_ids, prompt_mask, make_options("diffusion_gemma", options),
                                         generator=generator)


# ------------------------------------------------------------------------------------------------ family


def test_a_diffusion_gemma_folder_loads_as_its_family_on_the_native_class(standin, standin_policy):
    from transformers import DiffusionGemmaForBlockDiffusion

    assert policy_family(standin).name == "diffusion_gemma"  # from config.json alone, before any weight is read
    policy = standin_policy
    assert type(policy.model) is DiffusionGemmaForBlockDiffusion and policy.family.noise == "uniform"
    assert policy.default_sampler == "diffusion_gemma" and policy.chat_template
    # <eos> and the <end_of_turn> that closes a model turn, from the checkpoint's files
    assert policy.stop_token_ids == [policy.tokenizer.convert_tokens_to_ids("<eos>"),
                                     policy.tokenizer.convert_tokens_to_ids("<end_of_turn>")] == [1, 6]
    assert policy.format_prompt("sort 312") == "<bos><start_of_turn>user\nsort 312<end_of_turn>\n<start_of_turn>model\n"
    assert policy.tokenizer.chat_template == CHAT_TEMPLATE
    config = json.loads((standin / "config.json").read_text())
    assert config["model_type"] == "diffusion_gemma" and config["canvas_length"] == 8
    assert {"text_config", "vision_config", "boi_token_id"} <= set(config)
    bf16 = dare_gym.load_policy(standin, dtype="bfloat16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    out = bf16.generate(["sort 31\n"], gen_length=8, max_denoising_steps=2, seed=0)
    assert out[0].completion_ids.shape == (8,)


def test_the_split_forward_computes_a_left_padded_row_as_it_computes_it_alone(standin_policy):
    policy = standin_policy
    prompts = ["sort 5\n", "sort 9876543\n", "sort 12\n"]
    ids, mask = policy.encode_prompts(prompts)
    generator = torch.Generator().manual_seed(0)
    completion = torch.randint(0, 100, (3, 16), generator=generator)  # two canvases of 8
    batch = policy.logits(torch.cat([ids, completion], 1), torch.cat([mask, torch.ones_like(completion)], 1),
                          logits_to_keep=16)
    for row, prompt in enumerate(prompts):
        alone_ids, alone_mask = policy.encode_prompts([prompt])
        alone = policy.logits(torch.cat([alone_ids, completion[row:row + 1]], 1),
                              torch.cat([alone_mask, torch.ones_like(completion[row:row + 1])], 1), logits_to_keep=16)
        torch.testing.assert_close(batch[row], alone[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="logits_to_keep must name the canvas positions"):
        policy.logits(torch.cat([ids, completion], 1), None)


def test_canvas_j_reads_the_clean_canvases_before_it(standin_policy):
    """With clean_ids the second canvas's logits depend on the clean first canvas, not on its noised copy."""
    policy = standin_policy
    ids, mask = policy.encode_prompts(["sort 41\n"])
    generator = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 100, (1, 16), generator=generator)
    noisy_a, noisy_b = clean.clone(), clean.clone()
    noisy_b[:, :8] = torch.randint(0, 100, (1, 8), generator=generator)
    full_mask = torch.cat([mask, torch.ones_like(clean)], 1)
    a = policy.logits(torch.cat([ids, noisy_a], 1), full_mask, logits_to_keep=16, clean_ids=torch.cat([ids, clean], 1))
    b = policy.logits(torch.cat([ids, noisy_b], 1), full_mask, logits_to_keep=16, clean_ids=torch.cat([ids, clean], 1))
    torch.testing.assert_close(a[:, 8:], b[:, 8:])  # canvas 1 saw the same clean canvas 0
    assert not torch.allclose(a[:, :8], b[:, :8])  # canvas 0 itself was noised differently


# ----------------------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("settings", [
    dict(gen_length=16, max_new_tokens=16),  # two canvases, the checkpoint's schedule
    dict(gen_length=8, max_new_tokens=8, entropy_bound=2.5, t_min=0.1, t_max=1.5, max_denoising_steps=5),
])
def test_the_sampler_reproduces_generate_on_the_random_standin(standin_policy, settings):
    policy = standin_policy
    prompt = torch.randint(10, 100, (3, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(prompt)
    settings = dict(settings)
    max_new = settings.pop("max_new_tokens")
    generate_kwargs = {k: v for k, v in settings.items() if k in ("t_min", "t_max", "max_denoising_steps")}
    if "entropy_bound" in settings:
        from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

        generate_kwargs["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=settings["entropy_bound"])
    for seed in range(3):
        torch.manual_seed(seed)
        reference = policy.model.generate(prompt, attention_mask=mask, max_new_tokens=max_new,
                                          **generate_kwargs).sequences[:, prompt.shape[1]:]
        out = _sampler(policy, prompt, mask, torch.Generator().manual_seed(seed), temperature=1.0,
                       pad_after_stop=True, **settings)
        assert torch.equal(out.completion_ids[:, :reference.shape[1]], reference), seed


def test_the_sampler_reproduces_generate_with_its_stopping_rule_on_the_trained_checkpoint(tiny_gemma):
    """On tiny-gemma entropies fall below the bound and rows stop early: the stable-and-confident rule, the
    acceptance of several positions per step and the stop-token padding are all exercised."""
    policy = tiny_gemma
    env = dare_gym.make("digitsort-v0", split="test")
    prompts = [env.reset(options={"index": i})[0] for i in range(16)]
    encoded = [policy.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    length = len(encoded[0])
    same = [row for row in encoded if len(row) == length]  # generate() has no left padding: equal lengths
    prompt = torch.tensor(same)
    mask = torch.ones_like(prompt)
    stopped_early = False
    for seed in range(3):
        torch.manual_seed(seed)
        reference = policy.model.generate(prompt, attention_mask=mask, max_new_tokens=8,
                                          eos_token_id=policy.stop_token_ids).sequences[:, length:]
        out = _sampler(policy, prompt, mask, torch.Generator().manual_seed(seed), temperature=1.0, gen_length=8,
                       pad_after_stop=True)
        assert torch.equal(out.completion_ids, reference), seed
        stopped_early |= bool((out.trace["active"].sum(-1) < 8).any())  # a row stopped before its last step
        assert int(out.trace["accepted"].sum(-1).max()) > 1  # several positions accepted in one step
    assert stopped_early


def test_greedy_decoding_is_deterministic_and_proposes_the_argmax(tiny_gemma):
    policy = tiny_gemma
    first = policy.generate(["sort 583920\n", "sort 11\n"], temperature=0.0)
    again = policy.generate(["sort 583920\n", "sort 11\n"], temperature=0.0)
    assert [c.text for c in first] == [c.text for c in again]
    # one step from the initial canvas: the proposal at temperature 0 is the argmax of that step's logits
    ids, mask = policy.encode_prompts(["sort 583920\n"])
    out = _sampler(policy, ids, mask, torch.Generator().manual_seed(3), temperature=0.0, gen_length=8,
                   max_denoising_steps=1)
    canvas = torch.randint(0, policy.family.vocab_size(policy.model.config), (1, 8),
                           generator=torch.Generator().manual_seed(3))
    logits = policy.logits(torch.cat([ids, canvas], 1), torch.cat([mask, torch.ones_like(canvas)], 1),
                           logits_to_keep=8)
    assert torch.equal(out.completion_ids, logits.argmax(-1))
    assert torch.equal(out.trace["canvas"][:, 0].long(), canvas)


def test_entropy_bound_acceptance_against_enumeration():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        entropy = torch.rand(1, 7, generator=generator) * torch.rand(1, generator=generator)
        bound = float(torch.rand(1, generator=generator)) * 0.5
        accepted = entropy_bound_accept(entropy, bound)[0]
        values = sorted(entropy[0].tolist())
        best = max(k for k in range(1, 8) if sum(values[:k]) - max(values[:k]) <= bound)
        assert int(accepted.sum()) == best  # the largest admissible k (k = 1 always is)
        assert set(entropy[0][accepted].tolist()) == set(values[:best])


def test_acceptance_steps_of_a_hand_made_trace():
    # position 0: accepted as 5 at steps 1..3 (last 3); position 1: accepted 7 at 0, 9 at 1..3, final 9;
    # position 2: never accepted with its final value; position 3: accepted as 4 at 0..3 with a gap at 2
    accepted = torch.tensor([[[0, 1, 0, 1], [1, 1, 0, 1], [1, 1, 0, 0], [1, 1, 0, 1], [1, 1, 1, 1]]], dtype=torch.bool)
    proposals = torch.tensor([[[5, 7, 0, 4], [5, 9, 0, 4], [5, 9, 0, 4], [5, 9, 0, 4], [0, 0, 0, 0]]])
    final = torch.tensor([[5, 9, 8, 4]])
    steps = acceptance_steps(accepted, proposals, final, torch.tensor([3]))
    assert steps.tolist() == [[1, 1, 3, 3]]  # step 4 lies after the row's last step and is ignored


def test_the_trace_replays_to_the_samplers_own_log_probabilities(tiny_gemma):
    """uniform_trajectory replays every recorded canvas with its self-conditioning and scores each token at its
    acceptance step: at the rollout's weights it returns the sampler's commit_logp, and the trace says why each
    token's step is its acceptance step (held from there to the row's last step)."""
    policy = tiny_gemma
    completions = policy.generate(["sort 583920\n", "sort 4471\n", "sort 90\n"], temperature=1.0, seed=4)
    from dare_gym.core.buffer import RolloutBuffer

    buffer = RolloutBuffer.from_rollouts(["a", "b", "c"], completions, [0.0] * 3, [0, 0, 0],
                                         completion_mask_fn=lambda ids: torch.ones_like(ids), pad_token_id=0)
    batch = buffer.model_inputs("cpu")
    estimator = make_noise_estimator("trajectory", mask_token_id=None, noise="uniform",
                               vocab_size=policy.family.vocab_size(policy.model.config))
    assert isinstance(estimator, UniformTrajectory)
    noise = estimator.sample_noise(batch)
    with torch.no_grad():
        scores = estimator.token_logp(policy.logits, batch, noise)
    scored = scores.scored
    commit = buffer.columns["commit_logp"]
    assert scored.sum() > 0
    torch.testing.assert_close(scores.logp[scored], commit[scored], rtol=1e-5, atol=1e-5)
    assert len(scores.draws) == len(torch.unique(batch.unmask_step[scored]))
    for row, completion in enumerate(completions):  # the acceptance run, read from the recorded canvases
        active = completion.trace["active"]
        last = int(active.nonzero().max())
        for position, step in enumerate(completion.unmask_step.tolist()):
            token = int(completion.completion_ids[position])
            for s in range(step, last):  # accepted with this token at s: the next canvas holds it there
                assert completion.trace["accepted"][s, position]
                assert int(completion.trace["canvas"][s + 1, position]) == token
            if step > 0 and step < last:  # and not at the step before (else the run would start earlier)
                assert not (completion.trace["accepted"][step - 1, position]
                            and int(completion.trace["canvas"][step, position]) == token)


# -------------------------------------------------------------------------------------------- estimators


@pytest.fixture(scope="module")
def enumerable():
    """A random DiffusionGemma with a 6-id vocabulary and 2-token canvases: 36 noisy canvases in all."""
    from transformers import DiffusionGemmaForBlockDiffusion

    from dare_gym.models.diffusion_gemma import build_tokenizer

    config = standin_config(6, hidden_size=32, layers=2, heads=2, experts=2, canvas_length=2)
    torch.manual_seed(3)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    with torch.no_grad():  # sharper than init: the model's predictions then depend visibly on the canvas
        model.lm_head.weight.mul_(40.0)
    return DiffusionPolicy(model, build_tokenizer(), family="diffusion_gemma", mask_token_id=4)


def _batch(prompt: list[int], completion: list[int], rows: int = 1) -> SequenceBatch:
    ids = torch.tensor([prompt + completion] * rows)
    return SequenceBatch(input_ids=ids, attention_mask=torch.ones_like(ids), prompt_length=len(prompt),
                         completion_mask=torch.ones(rows, len(completion), dtype=torch.long))


def test_uniform_corruption_draws_exactly_q_t(enumerable):
    """Each token is kept or replaced by a uniform id (possibly itself): P(z = x) = α + (1 − α)/N."""
    tokens = torch.full((20000, 2), 3)
    t = torch.full((20000,), 0.4)
    z = corrupt(tokens, t, 6, torch.Generator().manual_seed(0))
    frequency = torch.bincount(z.flatten(), minlength=6).double() / z.numel()
    expected = torch.full((6,), 0.4 / 6, dtype=torch.float64)
    expected[3] += 0.6
    sigma = (expected * (1 - expected) / z.numel()).sqrt()
    assert ((frequency - expected).abs() < 5 * sigma).all(), (frequency, expected)


def _discrete_nelbo(prob: dict, clean: tuple, n: int, steps: int) -> float:
    """−ELBO of the T-step uniform-noise chain by enumeration: Σ_steps E_{z_t} Σ_k KL(q(z_s^k | z_t^k, x^k) ‖
    p_θ(z_s^k | z_t)), with p_θ the posterior with x replaced by the model's x̂_θ(z_t) (a mixture over x), α = 1 − t.
    ``prob[z]`` [L, N]: the model's distribution at each position given the whole noisy canvas z."""
    def q(alpha):  # q(z | x) as a matrix [x, z]
        return alpha * np.eye(n) + (1 - alpha) / n

    total = 0.0
    for k in range(1, steps + 1):
        t, s = k / steps, (k - 1) / steps
        at, as_ = 1 - t, 1 - s
        qts, qs, qt = q(at / as_), q(as_), q(at)
        for z, p in prob.items():
            weight = np.prod([qt[clean[i], z[i]] for i in range(len(z))])
            for i, (zi, xi) in enumerate(zip(z, clean)):
                posterior = qts[:, zi] * qs[xi] / qt[xi, zi]
                mixture = p[i] @ qs
                model = qts[:, zi] * mixture / (p[i] @ qt[:, zi])
                keep = posterior > 0
                total += weight * float((posterior[keep] * np.log(posterior[keep] / model[keep])).sum())
    return total


def test_the_uniform_elbo_estimator_integrates_to_the_discrete_time_elbo_by_enumeration(enumerable):
    """The elbo objective's value at a draw (t, z_t), averaged over every z_t (36 canvases, exact weights q_t)
    and integrated over t, is the continuous-time ELBO; the T-step chain's ELBO, computed from exact posterior KLs,
    converges to it as T grows (O(1/T))."""
    policy, prompt, clean, n = enumerable, [2, 5], (3, 1), 6
    canvases = list(itertools.product(range(n), repeat=2))
    with torch.no_grad():  # the model's x̂_θ(z) for every canvas, one batched forward
        ids = torch.tensor([prompt + list(z) for z in canvases])
        probs = torch.softmax(policy.logits(ids, torch.ones_like(ids), logits_to_keep=2).double(), -1).numpy()
    prob = {z: probs[i] for i, z in enumerate(canvases)}
    estimator = UniformCorruption(vocab_size=n, objective="elbo", t_min=1e-6, t_max=1.0)
    nodes, weights = np.polynomial.legendre.leggauss(60)
    u, w = (nodes + 1) / 2, weights / 2  # t = u² on [0, 1] tames the log(1/t) end
    rows = len(u) * len(canvases)
    t = torch.tensor(np.repeat(u ** 2, len(canvases)))
    noisy = torch.tensor(canvases * len(u))
    with torch.no_grad():
        scores = estimator.token_logp(policy.logits, _batch(prompt, list(clean), rows), {"t": t, "noisy": noisy})
    per_draw = scores.sequence().double().numpy() / (estimator.t_max - estimator.t_min)  # the integrand at (t, z)
    q_weight = np.array([np.prod([(1 - tt) * (zi == xi) + tt / n for zi, xi in zip(z, clean)])
                         for tt in u ** 2 for z in canvases])
    integrand = (per_draw * q_weight).reshape(len(u), len(canvases)).sum(axis=1)
    elbo = float((integrand * w * 2 * u).sum())
    discrete = [-_discrete_nelbo(prob, clean, n, steps) for steps in (100, 400)]
    assert discrete[0] < discrete[1] < elbo  # each refinement tightens toward the continuous bound
    limit = discrete[1] + (discrete[1] - discrete[0]) / 3  # Richardson: the error of the T-step ELBO is O(1/T)
    assert abs(elbo - limit) < 0.1 * (discrete[1] - discrete[0]) + 1e-4, (elbo, discrete, limit)


def test_the_ce_objective_is_the_training_cross_entropy_and_unbiased(enumerable):
    """ce: every token's log p_θ(x | z_t, prompt) at the drawn (t, z_t); its expectation over the draws is the
    enumerated E_t E_{z ~ q_t} Σ_k log p_θ(x^k | z)."""
    policy, prompt, clean, n = enumerable, [2, 5], (3, 1), 6
    estimator = UniformCorruption(vocab_size=n, objective="ce", t_min=0.2, t_max=0.8)
    rows = 6000
    batch = _batch(prompt, list(clean), rows)
    noise = estimator.sample_noise(batch, torch.Generator().manual_seed(0))
    assert float(noise["t"].min()) >= 0.2 and float(noise["t"].max()) < 0.8
    with torch.no_grad():
        scores = estimator.token_logp(policy.logits, batch, noise)
        canvases = list(itertools.product(range(n), repeat=2))
        ids = torch.tensor([prompt + list(z) for z in canvases])
        logp = torch.log_softmax(policy.logits(ids, torch.ones_like(ids), logits_to_keep=2).double(), -1)
    by_canvas = {z: float(logp[i, 0, clean[0]] + logp[i, 1, clean[1]]) for i, z in enumerate(canvases)}
    drawn = [by_canvas[tuple(z)] for z in noise["noisy"].tolist()]
    np.testing.assert_allclose(scores.sequence().double().numpy(), drawn, rtol=1e-5, atol=1e-5)
    nodes, weights = np.polynomial.legendre.leggauss(40)
    ts, w = 0.2 + 0.6 * (nodes + 1) / 2, weights / 2
    exact = sum(wi * sum(np.prod([(1 - t) * (zi == xi) + t / n for zi, xi in zip(z, clean)]) * value
                         for z, value in by_canvas.items()) for t, wi in zip(ts, w))
    values = scores.sequence().double()
    assert abs(float(values.mean()) - exact) < 5 * float(values.std()) / math.sqrt(rows), (float(values.mean()), exact)


def test_estimator_names_resolve_by_the_models_noise():
    assert isinstance(make_noise_estimator("d1", mask_token_id=None, noise="uniform", vocab_size=9), UniformCorruption)
    ratio = make_noise_estimator("random_ratio", mask_token_id=None, noise="uniform", vocab_size=9, t_min=0.3)
    assert isinstance(ratio, UniformCorruption) and ratio.t_min == 0.3
    with pytest.raises(ValueError, match="shrink must be 1"):
        make_noise_estimator("trajectory", mask_token_id=None, noise="uniform", vocab_size=9, shrink=4)
    with pytest.raises(ValueError, match="'coupled' masks tokens with \\[MASK\\] and has no uniform-noise counterpart"):
        make_noise_estimator("coupled", mask_token_id=None, noise="uniform", vocab_size=9)
    with pytest.raises(ValueError, match="p_mask_prompt"):
        make_noise_estimator("d1", mask_token_id=None, noise="uniform", vocab_size=9, p_mask_prompt=0.1)
    with pytest.raises(ValueError, match="scores uniform-noise models"):
        make_noise_estimator("uniform_corruption", mask_token_id=3)


def test_algorithms_choose_their_estimator_from_the_family_noise_and_refuse_the_rest():
    from dare_gym.algorithms import get_algorithm
    from dare_gym.models.families import get_family

    family = get_family("diffusion_gemma")
    d1 = make_algorithm("d1", build_config("d1", {}), mask_token_id=None, noise="uniform", vocab_size=9)
    assert isinstance(d1.estimator, UniformCorruption)
    for name in ("cj_grpo", "tracerl"):
        algorithm = make_algorithm(name, build_config(name, {}), mask_token_id=None, noise="uniform", vocab_size=9)
        assert isinstance(algorithm.estimator, UniformTrajectory)
    assert get_algorithm("sft").algorithm_class.refusal(family) is None
    reason = get_algorithm("spg").algorithm_class.refusal(family)
    assert "[MASK]" in reason and "diffusion_gemma models are trained to undo uniform noise" in reason
    assert "(algorithms with uniform-noise estimators: cj_grpo, d1, reinforce, sft, tracerl, wd1)" in reason
    with pytest.raises(ValueError, match="spg cannot train a model trained to undo uniform noise"):
        make_algorithm("spg", build_config("spg", {}), mask_token_id=None, noise="uniform", vocab_size=9)


def test_the_uniform_sft_loss_is_the_cross_entropy_of_the_second_pass(tiny_gemma):
    policy = tiny_gemma
    ids, mask = policy.encode_prompts(["sort 583920\n", "sort 11\n"])
    answers = torch.tensor([[policy.tokenizer.convert_tokens_to_ids(c) for c in "023589"] + [1, 1],
                            [policy.tokenizer.convert_tokens_to_ids(c) for c in "11"] + [1] * 6])
    present = torch.ones_like(answers, dtype=torch.bool)
    vocab = policy.family.vocab_size(policy.model.config)
    noisy = corrupt(answers, torch.tensor([0.5, 0.9]), vocab, torch.Generator().manual_seed(2))
    use_sc = torch.tensor([True, False])
    with torch.no_grad():
        loss = uniform_sft_loss(policy, ids, mask, answers, present, noisy, use_sc)
        full_ids, full_mask = torch.cat([ids, noisy], 1), torch.cat([mask, present.long()], 1)
        clean = torch.cat([ids, answers], 1)
        first = policy.logits(full_ids, full_mask, logits_to_keep=8, clean_ids=clean)
        second = policy.logits(full_ids[:1], full_mask[:1], logits_to_keep=8, clean_ids=clean[:1],
                               self_conditioning=first[:1])
        nll = [-torch.log_softmax(second[0], -1).gather(-1, answers[0, :, None]).mean(),
               -torch.log_softmax(first[1], -1).gather(-1, answers[1, :, None]).mean()]
    torch.testing.assert_close(loss, torch.stack(nll).mean(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- training


def test_lora_adapts_the_shared_encoder_and_decoder_once(tiny_gemma, tmp_path):
    import copy

    from dare_gym.core.lora import LoraSettings, apply_lora, save_lora_policy

    policy = copy.copy(tiny_gemma)
    policy.model = copy.deepcopy(tiny_gemma.model)
    ids, mask = policy.encode_prompts(["sort 312\n", "sort 99881\n"])
    canvas = torch.randint(5, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    x, m = torch.cat([ids, canvas], 1), torch.cat([mask, torch.ones_like(canvas)], 1)
    apply_lora(policy, LoraSettings(r=4, alpha=8), verbose=False)
    base = policy.model.get_base_model()
    encoder, decoder = base.model.encoder.language_model.layers[0], base.model.decoder.layers[0]
    assert encoder.self_attn.q_proj is decoder.self_attn.q_proj and hasattr(decoder.self_attn.q_proj, "lora_A")
    with torch.no_grad():
        for name, parameter in policy.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        adapted = policy.logits(x, m, logits_to_keep=8)
    save_lora_policy(policy, tmp_path / "merged", merged=True)
    save_lora_policy(policy, tmp_path / "adapter", merged=False)
    with torch.no_grad():
        # merging folds the one shared delta into the one shared weight: the encoder saw the adapter too
        merged = dare_gym.load_policy(tmp_path / "merged").logits(x, m, logits_to_keep=8)
        reloaded = dare_gym.load_policy(tmp_path / "adapter").logits(x, m, logits_to_keep=8)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reloaded, adapted)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_gemma):
    import copy

    from dare_gym.core.precision import enable_activation_checkpointing

    ids, mask = tiny_gemma.encode_prompts(["sort 312\n"])
    canvas = torch.randint(5, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        policy = copy.copy(tiny_gemma)
        policy.model = copy.deepcopy(tiny_gemma.model).train()
        if checkpointing:
            enable_activation_checkpointing(policy.model)
        logits = policy.logits(torch.cat([ids, canvas], 1), torch.cat([mask, torch.ones_like(canvas)], 1),
                               logits_to_keep=8)
        logits.logsumexp(-1).sum().backward()
        grads.append(policy.model.model.decoder.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def _train(args: list[str]) -> tuple[int, str]:
    from dare_gym.tools.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(["train", *args])
    return code, out.getvalue()


LEARNING = {  # settings (beyond the algorithm's own defaults) that learn at this scale in about 35 s
    "d1": ["algorithm.num_iterations=4", "rollout.temperature=0.7"],
    # most groups at 21% accuracy fall outside TraceRL's [0.2, 0.8] band; temperature 1 is the checkpoint's sampling
    "tracerl": ["algorithm.accuracy_filter=null", "rollout.temperature=1.0"],
}


@pytest.mark.parametrize("algorithm", sorted(LEARNING))
def test_tiny_gemma_learns_from_the_checker_on_the_command_line(algorithm, tmp_path):
    code, printed = _train(["policy=tiny-gemma", f"algorithm.name={algorithm}", *LEARNING[algorithm],
                            "env=digitsort-v0", "max_steps=16", "prompts_per_step=16", "group_size=8",
                            "learning_rate=3e-4", "eval_size=200", "eval_every=16",
                            "progress=false", "time_limit_minutes=null", "torch_threads=1", f"output_dir={tmp_path}"])
    assert code == 0, printed
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["heldout_reward"] for r in history if "heldout_reward" in r]
    assert rewards[-1] >= rewards[0] + 0.015, f"{algorithm}: held-out reward {rewards}"


# ------------------------------------------------------------------------------------------ served rollouts


def test_the_vllm_backend_rolls_out_through_a_served_policy_and_syncs_its_weights(tiny_gemma, tmp_path):
    """The backend's CPU side against `dare-gym serve` on loopback: requests in, completions parsed into the
    sampler output (the same tokens the local sampler draws with the request's seed), no trace beyond which
    positions were padded; then a weight sync puts the trainer's new weights into the server."""
    import copy

    from dare_gym.tools.serve import ServerThread

    served = copy.copy(tiny_gemma)
    served.model = copy.deepcopy(tiny_gemma.model)
    trainer = copy.copy(tiny_gemma)
    trainer.model = copy.deepcopy(tiny_gemma.model)
    prompts = ["sort 583920\n", "sort 4471\n", "sort 90\n"]
    with ServerThread(served, model_name="tiny-gemma", allow_weight_loading=True, batch_wait_ms=0) as server:
        options = dict(sampler="vllm", base_url=server.base_url, request_seed=11, temperature=1.0, gen_length=8,
                       weight_sync="checkpoint", sync_folder=str(tmp_path / "sync"))
        remote = trainer.generate(prompts, **options)
        local = trainer.generate(prompts, seed=11, temperature=1.0, gen_length=8)
        for r, l in zip(remote, local):
            kept = int(trainer.completion_mask(l.completion_ids[None]).sum())  # up to and including the stop
            assert r.text == l.text and torch.equal(r.completion_ids[:kept], l.completion_ids[:kept])
            assert r.trace["filled"][kept:].all() and not r.trace["filled"][:kept].any()
            assert not r.unmask_step.any()  # the server returns no acceptance steps
        with torch.no_grad():  # an "update": the trainer's weights move
            for parameter in trainer.model.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
        moved = trainer.generate(prompts, seed=11, temperature=1.0, gen_length=8)
        assert [c.text for c in moved] != [c.text for c in local]
        name, sampler_options = trainer.sampler_settings("vllm", {k: v for k, v in options.items() if k != "sampler"})
        get_sampler(name).after_update(trainer, sampler_options)
        synced = trainer.generate(prompts, **options)
        assert [c.text for c in synced] == [c.text for c in moved]
    with pytest.raises(ValueError, match="sync_folder"):
        make_options("vllm", dict(weight_sync="checkpoint"))


def test_trajectory_algorithms_refuse_served_rollouts_that_carry_no_trace(tiny_gemma):
    from dare_gym.core.buffer import RolloutBuffer
    from dare_gym.core.policy import Completion

    completion = Completion(text="1", prompt_ids=torch.tensor([5, 6]), completion_ids=torch.tensor([20, 1] + [1] * 6),
                            unmask_step=torch.zeros(8, dtype=torch.long), commit_logp=torch.zeros(8),
                            trace={"filled": torch.tensor([False, False] + [True] * 6)})
    buffer = RolloutBuffer.from_rollouts(["p"], [completion], [1.0], [0], completion_mask_fn=torch.ones_like,
                                         pad_token_id=0)
    estimator = make_noise_estimator("trajectory", mask_token_id=None, noise="uniform", vocab_size=106)
    with pytest.raises(ValueError, match="roll out with sampler diffusion_gemma"):
        estimator.sample_noise(buffer.model_inputs("cpu"))


def test_the_worked_example_of_docs_uniform_noise():
    """docs/UNIFORM_NOISE.md, worked by hand: N = 3, x = 0, a denoiser that predicts (0.7, 0.2, 0.1) whatever the
    canvas, t = 0.5. The per-token ELBO terms at z = 0, 1, 2 are −0.0833, −0.5715, −0.3178 (E_z = −0.2038); and
    since this denoiser ignores z, the reverse process draws x from (0.7, 0.2, 0.1) in effect, so the bound is
    tight: the integral over t is log 0.7 exactly."""
    from dare_gym.core.uniform_estimators import uniform_elbo_terms

    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    logits = p.log()[None, None].expand(1, 3, 3).clone()
    terms = uniform_elbo_terms(logits, torch.zeros(1, 3, dtype=torch.long), torch.arange(3)[None], torch.tensor([0.5]))
    np.testing.assert_allclose(terms[0].numpy(), [-0.083297, -0.571482, -0.317848], atol=2e-6)
    q = np.array([0.5 + 0.5 / 3, 0.5 / 3, 0.5 / 3])
    assert abs(float((q * terms[0].numpy()).sum()) + 0.203753) < 2e-6
    nodes, weights = np.polynomial.legendre.leggauss(200)
    u, w = (nodes + 1) / 2, weights / 2
    total = 0.0
    for ui, wi in zip(u, w):
        t = ui ** 2
        qt = np.full(3, t / 3)
        qt[0] += 1 - t
        value = uniform_elbo_terms(logits, torch.zeros(1, 3, dtype=torch.long), torch.arange(3)[None],
                                   torch.tensor([t]))[0].numpy()
        total += wi * 2 * ui * float((qt * value).sum())
    assert abs(total - math.log(0.7)) < 1e-4, total


def test_fsdp2_shards_each_encoder_decoder_pair_as_one_unit_and_keeps_them_tied(tiny_gemma):
    """One gloo process: after ``shard_fsdp`` with the family's units the encoder and decoder still share every
    weight, and the sharded model computes what the plain one does (and gets gradients)."""
    import copy
    import os

    import torch.distributed as dist

    from dare_gym.core.distributed import shard_fsdp
    from dare_gym.tools.serve import bind_socket

    with bind_socket("127.0.0.1", 0) as sock:
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = copy.deepcopy(tiny_gemma.model)
        ids, mask = tiny_gemma.encode_prompts(["sort 312\n"])
        canvas = torch.randint(5, 100, (1, 8), generator=torch.Generator().manual_seed(0))
        x, m = torch.cat([ids, canvas], 1), torch.cat([mask, torch.ones_like(canvas)], 1)
        want = tiny_gemma.family.logits(tiny_gemma.model, x, m, logits_to_keep=8)
        shard_fsdp(model, torch.float32, tiny_gemma.family)
        encoder, decoder = model.model.encoder.language_model.layers[1], model.model.decoder.layers[1]
        assert encoder.mlp.up_proj.weight is decoder.mlp.up_proj.weight
        got = tiny_gemma.family.logits(model, x, m, logits_to_keep=8)
        torch.testing.assert_close(got, want)
        got.logsumexp(-1).sum().backward()
        assert decoder.mlp.up_proj.weight.grad is not None
    finally:
        dist.destroy_process_group()
