"""Trajectory methods train from fast rollouts; the rollout/train mismatch of approximate caches is measured on
committed tokens, and a truncated importance weight corrects for it on request."""

from __future__ import annotations

import math

import pytest
import torch

from dare_gym.core.config import ConfigError
from dare_gym.core.losses import truncated_importance_weight
from dare_gym.train.trainer import GenerationConfig, TrainConfig, Trainer, resolve

SCHEDULE = dict(gen_length=8, steps=8, block_length=4, temperature=1.0)
FAST = GenerationConfig(**SCHEDULE, sampler="fast_dllm", options={"cache": "dual", "threshold": None,
                                                                   "early_exit": False})


def test_truncated_importance_weight_worked_numbers():
    weight = truncated_importance_weight(torch.tensor([0.0, math.log(3.0), -math.log(2.0)]), 2.0)
    torch.testing.assert_close(weight, torch.tensor([1.0, 2.0, 0.5]))


def _update(tmp_path, algorithm: dict, rollout: GenerationConfig, name: str) -> dict:
    config = TrainConfig(algorithm=algorithm, rollout=rollout, prompts_per_step=4, group_size=4, max_steps=1,
                         eval_size=0, progress=False, time_limit_minutes=None, output_dir=str(tmp_path / name))
    trainer = Trainer(config)
    buffer, stats = trainer.collect()
    assert "commit_logp" in buffer.columns
    stats.update(trainer.update(buffer))
    return stats


def test_the_gap_is_zero_for_exact_rollouts_and_measured_for_cached_ones(tmp_path):
    algorithm = {"name": "cj_grpo", "num_iterations": 1, "beta": 0.0}
    exact = _update(tmp_path, algorithm, GenerationConfig(**SCHEDULE, sampler="llada"), "exact")
    cached = _update(tmp_path, algorithm, FAST, "cached")
    assert exact["rollout_logp_gap"] < 1e-4
    assert cached["rollout_logp_gap"] > 1e-3
    corrected = _update(tmp_path, dict(algorithm, rollout_is_cap=2.0), FAST, "corrected")
    assert corrected["rollout_logp_gap"] > 1e-3 and corrected["rollout_is_weight"] != pytest.approx(1.0, abs=1e-6)
    assert corrected["rollout_is_weight"] <= 2.0


@pytest.mark.parametrize("algorithm", ["tracerl", "mdpo"])
def test_trajectory_methods_train_from_fast_rollouts(tmp_path, algorithm):
    stats = _update(tmp_path, {"name": algorithm}, FAST, algorithm)
    assert stats["rows_trained"] > 0 and math.isfinite(stats["loss"])
    if algorithm == "tracerl":
        assert stats["rollout_logp_gap"] > 1e-3


def test_the_weight_needs_the_trajectory_estimator():
    with pytest.raises(ConfigError, match="rollout_is_cap.*trajectory"):
        resolve(TrainConfig(algorithm={"name": "d1", "rollout_is_cap": 2.0}))
