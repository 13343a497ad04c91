"""What a run records besides its metrics: a few rollouts every log_every steps (samples.jsonl, TensorBoard text,
a Weights & Biases table in offline mode), and curves.png's training panels."""

from __future__ import annotations

import json


from dare_gym.core.config import load_config
from dare_gym.train.metrics import curve_panels
from dare_gym.train.trainer import TrainConfig, Trainer

TINY = dict(prompts_per_step=3, group_size=2, max_steps=3, eval_size=4, eval_every=3, save_every=10,
            progress=False, time_limit_minutes=None, torch_threads=1, log_every=2, log_samples=2)


def config(tmp_path, **overrides) -> TrainConfig:
    options = {**TINY, "output_dir": str(tmp_path / "run"), **overrides}
    return load_config(TrainConfig, None, [f"{k}={json.dumps(v)}" for k, v in options.items()])


def test_samples_every_log_every_steps_in_jsonl_and_tensorboard_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(config(tmp_path, tensorboard=True)).train()
    run = tmp_path / "run"
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    # steps 1 (the first), 2 (log_every) and 3 (the last); one rollout of each of the first 2 groups
    assert [s["step"] for s in samples] == [1, 1, 2, 2, 3, 3]
    for sample in samples:
        digits = sample["prompt"].split()[1]
        assert sample["prompt"].startswith("sort ") and digits.isdigit()
        assert isinstance(sample["completion"], str) and 0.0 <= sample["reward"] <= 1.0
        assert sample["correct"] == (sample["completion"].strip() == "".join(sorted(digits)))
    assert samples[0]["prompt"] != samples[1]["prompt"]  # two groups, not two rollouts of one prompt
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    texts = events.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [1, 2, 3]
    first = texts[0].tensor_proto.string_val[0].decode()
    assert "| prompt | completion | reward | correct |" in first and samples[0]["prompt"].strip() in first
    assert [s.step for s in events.Scalars("reward_mean")] == [1, 2, 3]


def test_the_wandb_logger_in_offline_mode_records_metrics_and_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    Trainer(config(tmp_path, wandb={"project": "dare-gym-test", "mode": "offline"})).train()
    run = tmp_path / "run"
    [folder] = (run / "wandb").glob("offline-run-*")  # wandb.init's dir is the run's folder
    # the samples of each logged step as a wandb.Table, row for row those of samples.jsonl
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    for step in (1, 2, 3):
        [table] = (folder / "files" / "media" / "table").glob(f"samples_{step}_*.table.json")
        table = json.loads(table.read_text())
        assert table["columns"] == ["prompt", "completion", "reward", "correct"]
        assert table["data"] == [[s[c] for c in table["columns"]] for s in samples if s["step"] == step]
    # the offline run file holds each step's scalars (history values are stored as JSON text)
    history = (folder / f"{folder.name.split('-')[-1].join(['run-', '.wandb'])}").read_bytes()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in records[1:]:
        assert json.dumps(record["reward_mean"]).encode() in history and b"learning_rate" in history
    assert json.dumps(records[-1]["heldout_accuracy"]).encode() in history


def test_curves_gain_panels_for_the_metrics_a_run_logged():
    history = [{"step": 0, "elapsed_s": 0.0, "heldout_accuracy": 0.4, "heldout_reward": 0.8}]
    history += [{"step": s, "elapsed_s": 2.0 * s, "reward_mean": 0.5, "train_accuracy": 0.4, "kl_ref": 0.01,
                 "entropy": 1.0, "clip_fraction": 0.1, "completion_length": 7.0, "time_rollout": 1.0,
                 "learning_rate": 1e-4} for s in (1, 2)]
    panels = dict(curve_panels(history))
    assert list(panels) == ["KL", "entropy", "clip fraction", "completion length (tokens)", "seconds per step",
                            "learning rate"]
    assert panels["KL"] == [("kl_ref", "to the reference")]  # approx_kl_old was not logged
    assert [key for key, _ in panels["seconds per step"]] == ["time_step", "time_rollout"]
    # an algorithm without a reference or clipping: no panel for them
    plain = [{k: v for k, v in r.items() if k not in ("kl_ref", "clip_fraction")} for r in history]
    assert "KL" not in dict(curve_panels(plain)) and "clip fraction" not in dict(curve_panels(plain))
