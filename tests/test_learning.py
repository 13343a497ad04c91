"""The learning claim, shortened: the default recipe raises held-out greedy accuracy of the tiny model from
the checker alone. (The full claim, 3 seeds over minutes, is experiments/bench_learning.py.)"""

from __future__ import annotations

from dare_gym.tools.cli import default_config_path
from dare_gym.core.config import load_config
from dare_gym.train.trainer import Trainer, TrainConfig


def test_default_recipe_learns_from_the_verifier_alone(tmp_path):
    config = load_config(TrainConfig, default_config_path(), [
        f"output_dir={tmp_path}", "max_steps=15", "eval_every=15", "eval_size=300", "progress=false",
        "time_limit_minutes=null", "seed=1",
    ])
    summary = Trainer(config).train()
    before, after = summary["heldout_accuracy_before"], summary["heldout_accuracy_after"]
    assert after - before >= 0.15, f"held-out accuracy {before:.3f} -> {after:.3f}"
