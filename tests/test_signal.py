"""Runs that cannot learn say so: a step with no learning signal is reported at once with its cause, a streak
of them stops the run (exit code 3), ``strict_rewards`` fails a run whose reward fails everywhere, and the time
guard says when it cut a run short."""

from __future__ import annotations

import json

import pytest

from dare_gym.core.config import load_config
from dare_gym.train.signal import NoSignalWatch, RewardFailedEverywhere, no_signal_cause
from dare_gym.train.trainer import TrainConfig, Trainer
from helpers import run_cli as run

TINY = dict(prompts_per_step=2, group_size=2, max_steps=3, eval_size=0, save_every=10, progress=True,
            time_limit_minutes=None, torch_threads=1)


def config(tmp_path, **overrides) -> TrainConfig:
    options = {**TINY, "output_dir": str(tmp_path / "run"), **overrides}
    return load_config(TrainConfig, None, [f"{k}={json.dumps(v)}" for k, v in options.items()])


def test_group_size_one_is_reported_at_once_and_stops_the_run_with_exit_code_3(tmp_path):
    out = run("train", f"output_dir={tmp_path / 'run'}", "group_size=1", "prompts_per_step=2", "eval_size=0",
              "max_steps=6", "stop_after_no_signal_steps=2", "log_every=10", "torch_threads=1")
    assert out.returncode == 3, out.stderr
    warnings = [line for line in out.stdout.splitlines() if line.startswith("warning: no learning signal")]
    assert warnings and warnings[0].startswith("warning: no learning signal at step 1 (rows_trained 0")
    assert "group_size=1" in warnings[0] and "set group_size to 2 or more" in warnings[0]
    assert "dare-gym train: stopped after 2 consecutive steps with no learning signal" in out.stderr
    assert "group_size=1" in out.stderr and "stop_after_no_signal_steps=null" in out.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["stopped_by"] == "no_signal"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rows_trained"] for r in records[1:]] == [0.0, 0.0]


def always_zero(completion, sample):
    return 0.0


def always_fails(completion, sample):
    raise ValueError("no <answer> tag")


def test_a_reward_of_zero_everywhere_is_named_as_the_cause(tmp_path, capsys):
    run_config = config(tmp_path, max_steps=2, stop_after_no_signal_steps=None)
    run_config.env_kwargs = {"reward": always_zero}
    summary = Trainer(run_config).train()
    assert summary["steps"] == 2 and summary["stopped_by"] == "max_steps" and summary["stop_message"] is None
    lines = [line for line in capsys.readouterr().out.splitlines() if "no learning signal" in line]
    assert len(lines) == 1 and "at step 1" in lines[0]  # the first of a streak, then every log_every steps
    assert "every completion scored 0" in lines[0] and "too hard" in lines[0]
    assert "stops after" not in lines[0]  # stop_after_no_signal_steps=null: never stopped for it


def test_strict_rewards_fails_the_run_at_the_first_step_a_reward_fails_everywhere(tmp_path, capsys):
    run_config = config(tmp_path, strict_rewards=True)
    run_config.env_kwargs = {"reward": always_fails}
    with pytest.raises(RewardFailedEverywhere, match="strict_rewards: reward 'always_fails' failed on all 4 rollouts "
                                                    "at step 1, e.g. ValueError: no <answer> tag"):
        Trainer(run_config).train()
    # without it the run goes on, and its no-signal report names the failing reward as the cause
    run_config = config(tmp_path / "lenient", max_steps=1)
    run_config.env_kwargs = {"reward": always_fails}
    assert Trainer(run_config).train()["steps"] == 1
    out = capsys.readouterr().out
    assert "no learning signal at step 1 (rows_trained 0, 1 step(s) in a row): reward 'always_fails' failed on " \
           "every rollout (e.g. ValueError: no <answer> tag (test_signal.py:" in out


def test_the_time_guard_says_it_stopped_a_run_early(tmp_path, capsys):
    summary = Trainer(config(tmp_path, max_steps=50, time_limit_minutes=1e-4)).train()
    assert summary["stopped_by"] == "time_limit" and summary["steps"] < 50
    assert f"after {summary['steps']} of max_steps=50 steps" in summary["stop_message"]
    assert summary["stop_message"] in capsys.readouterr().out


def test_the_causes_of_no_signal_and_what_to_change():
    def cause(**stats):
        return no_signal_cause(stats, group_size=8, gen_length=8, reward_errors=[{}, {}])

    assert "raise rollout.gen_length" in cause(reward_mean=0.0, reward_std=0.0, truncated_fraction=1.0)
    assert "(rollout.gen_length=8)" in cause(reward_mean=0.0, reward_std=0.0, truncated_fraction=1.0)
    assert "policy stops at once" in cause(reward_mean=0.0, reward_std=0.0, completion_length=1.0,
                                           truncated_fraction=0.0)
    assert "does not tell completions apart" in cause(reward_mean=1.0, reward_std=0.0, completion_length=6.0)
    assert "raise rollout.temperature" in cause(reward_mean=0.5, reward_std=0.3, zero_variance_fraction=1.0)
    assert "dropped every row" in cause(reward_mean=0.5, reward_std=0.3, zero_variance_fraction=0.5)


def test_the_watch_reports_a_streak_at_its_start_and_every_n_steps_and_resets_on_signal():
    watch = NoSignalWatch(limit=5, every=3)
    said = [watch.observe(step, 0.0, "c") is not None for step in range(1, 5)]
    assert said == [True, False, True, False] and not watch.exhausted
    assert watch.observe(5, 4.0, None) is None and watch.streak == 0
    for step in range(6, 11):
        watch.observe(step, 0.0, "c")
    assert watch.exhausted and watch.stop_message().startswith("stopped after 5 consecutive steps")
