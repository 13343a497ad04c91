"""Learning-rate schedules: the logged per-step rate against the formula written out here, the optimizer training
at that rate, and a resumed run going on with the rates (and weights) of an uninterrupted one."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dare_gym.core.config import ConfigError, load_config
from dare_gym.train.trainer import TrainConfig, Trainer

TINY = dict(prompts_per_step=2, group_size=4, eval_size=0, save_every=2, progress=False, time_limit_minutes=None,
            torch_threads=1, learning_rate=1e-3, stop_after_no_signal_steps=None)


def config(output, **overrides) -> TrainConfig:
    options = {**TINY, "output_dir": str(output), **overrides}
    return load_config(TrainConfig, None, [f"{k}={json.dumps(v)}" for k, v in options.items()])


def logged_rates(output) -> list[float]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r["learning_rate"] for r in records if r["step"] > 0]


def expected_rate(step, peak, schedule, warmup, total, floor):
    """Warmup to the peak at step `warmup`, then decay from the peak to floor x peak at step `total` (float64)."""
    if step <= warmup:
        return peak * step / warmup
    progress = (step - warmup) / (total - warmup)
    decay = {"constant": 1.0, "linear": 1.0 - progress, "cosine": (1.0 + math.cos(math.pi * progress)) / 2}[schedule]
    return peak * floor + peak * (1.0 - floor) * decay if schedule != "constant" else peak


@pytest.mark.parametrize("schedule,options,warmup", [
    ("cosine", {"warmup_steps": 2, "min_lr_ratio": 0.1}, 2),
    ("linear", {"warmup_ratio": 0.4}, 2),  # ceil(0.4 x 5)
])
def test_the_logged_rate_of_each_step_follows_the_schedule_and_the_optimizer_uses_it(tmp_path, schedule, options,
                                                                                      warmup):
    trainer = Trainer(config(tmp_path, max_steps=5, lr_schedule=schedule, **options))
    trainer.train()
    floor = options.get("min_lr_ratio", 0.0)
    expected = [expected_rate(t, 1e-3, schedule, warmup, 5, floor) for t in range(1, 6)]
    assert logged_rates(tmp_path) == pytest.approx(expected, rel=1e-12, abs=0)
    assert expected[warmup - 1] == pytest.approx(1e-3) and expected[-1] == pytest.approx(1e-3 * floor)
    assert [g["lr"] for g in trainer.optimizer.optimizer.param_groups] == [pytest.approx(expected[-1])]


def test_a_resumed_run_goes_on_with_the_rates_and_weights_of_an_uninterrupted_one(tmp_path):
    run = config(tmp_path, max_steps=4, lr_schedule="cosine", warmup_steps=1)
    straight = Trainer(run)
    straight.train()
    rates = logged_rates(tmp_path)
    # as if the run had been stopped after its checkpoint at step 2: resume from there to step 4
    (tmp_path / "checkpoints" / "latest").write_text("step-000002\n")
    resumed = Trainer(config(tmp_path, max_steps=4, lr_schedule="cosine", warmup_steps=1))
    resumed.train(resume=True)
    assert logged_rates(tmp_path) == rates and len(rates) == 4 and rates[0] == 1e-3 and rates[1] < 1e-3
    for a, b in zip(straight.policy.model.parameters(), resumed.policy.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("overrides,message", [
    ({"lr_schedule": "step"}, "lr_schedule must be one of constant, linear, cosine, got 'step'"),
    ({"warmup_steps": 2, "warmup_ratio": 0.1}, "set warmup_steps \\(2\\) or warmup_ratio \\(0.1\\), not both"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio must be in \\[0, 1\\], got 1.5"),
])
def test_bad_schedule_settings_are_named(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, **overrides)
