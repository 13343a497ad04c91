"""Device and precision: parsing, bf16 training with float32 master weights, reproducible runs, gradient
checkpointing, and sampler choice in the train config. (The CUDA path is the same code with device=cuda;
experiments/gpu_check.py runs it where a GPU is lent.)"""

from __future__ import annotations

import pytest
import torch

import dare_gym
from dare_gym.core.config import ConfigError
from dare_gym.core.device import resolve_device, resolve_dtype, uniform
from dare_gym.models.standin import build_standin
from dare_gym.core.precision import MasterWeightAdamW, enable_activation_checkpointing
from dare_gym.train.trainer import GenerationConfig, TrainConfig, Trainer, resolve

TINY_RUN = dict(prompts_per_step=2, group_size=4, max_steps=1, eval_size=0, progress=False, time_limit_minutes=None,
                rollout=GenerationConfig(temperature=1.0))


def test_device_and_dtype_values_are_checked_and_named():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float32") is torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    with pytest.raises(ValueError, match="device must be one of.*got 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="dtype must be one of.*got 'float16'"):
        resolve_dtype("float16")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda.*no CUDA GPU"):
            resolve(TrainConfig(device="cuda"))
    with pytest.raises(ConfigError, match="policy_family.*unknown model family 'gpt'"):
        resolve(TrainConfig(policy_family="gpt"))


def test_draws_follow_the_generator_wherever_it_lives():
    generator = torch.Generator().manual_seed(0)
    first = uniform((3, 4), generator, "cpu")
    assert first.shape == (3, 4) and first.device.type == "cpu"
    assert torch.equal(uniform((3, 4), torch.Generator().manual_seed(0), "cpu"), first)  # same seed, same draws
    assert not torch.equal(uniform((3, 4), generator, "cpu"), first)  # the stream moves on
    assert uniform(2, None, "cpu", torch.float64).dtype is torch.float64


def test_master_weights_keep_updates_a_bfloat16_weight_would_drop():
    """At 1.0 a bf16 weight moves in steps of 2⁻⁷: AdamW's ~lr-sized steps of 1e-4 vanish when applied to it
    directly, while the float32 master accumulates them and the weight follows."""
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    naive = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    master = MasterWeightAdamW([weight], lr=1e-4)
    plain = torch.optim.AdamW([naive], lr=1e-4, weight_decay=0.0)
    for _ in range(200):
        for parameter in (weight, naive):
            parameter.grad = torch.ones_like(parameter)
        master.clip_and_step(1e9)
        plain.step()
    assert torch.equal(naive.detach(), torch.ones(4, dtype=torch.bfloat16))  # every step lost to rounding
    assert master.masters[0].dtype == torch.float32
    assert torch.allclose(master.masters[0], torch.full((4,), 1 - 200 * 1e-4), atol=1e-4)
    assert (weight.detach().float() < 1).all()  # the bf16 weight follows its master
    state = master.state_dict()
    restored = MasterWeightAdamW([torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))], lr=1e-4)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.masters[0], master.masters[0])


def test_bfloat16_training_step_keeps_float32_where_it_matters(tmp_path):
    config = TrainConfig(dtype="bfloat16", output_dir=str(tmp_path), **TINY_RUN)
    trainer = Trainer(config)
    assert next(trainer.policy.model.parameters()).dtype is torch.bfloat16
    assert trainer.optimizer.has_copies and all(m.dtype is torch.float32 for m in trainer.optimizer.masters)
    before = {k: v.clone() for k, v in trainer.policy.model.state_dict().items()}
    buffer, _ = trainer.collect()
    inputs = buffer.model_inputs(trainer.policy.device)
    scores = trainer.algorithm.estimator.token_logp(trainer.policy.logits, inputs,
                                                    trainer.algorithm.estimator.sample_noise(inputs, trainer.generator))
    assert scores.logp.dtype is torch.float32
    stats = trainer.update(buffer)
    assert torch.isfinite(torch.tensor(stats["loss"]))
    after = trainer.policy.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_run_is_reproducible_for_a_seed_on_a_device(tmp_path):
    def run(folder):
        trainer = Trainer(TrainConfig(output_dir=str(tmp_path / folder), **dict(TINY_RUN, max_steps=2)))
        for _ in range(2):
            buffer, stats = trainer.collect()
            stats.update(trainer.update(buffer))
        return trainer.policy.model.state_dict(), stats

    first, first_stats = run("a")
    second, second_stats = run("b")
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert first_stats["loss"] == second_stats["loss"]


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    folder = build_standin("llada", tmp_path / "llada")
    grads = []
    for checkpointing in (False, True):
        policy = dare_gym.load_policy(folder)
        if checkpointing:
            enable_activation_checkpointing(policy.model)
        policy.model.train()
        ids = torch.tensor([[5, 6, 7, 3, 3, 9]])
        policy.logits(ids, torch.ones_like(ids)).float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in policy.model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_the_rollout_sampler_is_chosen_in_the_config_and_checked_early(tmp_path):
    rollout = GenerationConfig(temperature=1.0, sampler="fast_dllm", options={"cache": "dual", "threshold": 0.8})
    trainer = Trainer(TrainConfig(output_dir=str(tmp_path), **dict(TINY_RUN, rollout=rollout)))
    buffer, stats = trainer.collect()
    assert len(buffer) == 8 and stats["completion_length"] > 0
    with pytest.raises(ValueError, match="sampler 'unknown'.*block_diffusion, diffusion_gemma, fast_dllm, llada, vllm"):
        GenerationConfig(sampler="unknown")
    bad = GenerationConfig(sampler="fast_dllm", options={"cach": "dual"})
    with pytest.raises(ConfigError, match="rollout: option cach: not taken by sampler 'fast_dllm'; its options: "):
        Trainer(TrainConfig(output_dir=str(tmp_path / "bad"), **dict(TINY_RUN, rollout=bad)))
