"""Every algorithm learns: from the tiny model's SFT checkpoint, a short run on the embedded default task
raises held-out reward. Settings come from experiments/configs/compare_default.yaml (the same file
`dare-gym compare` uses), so the comparison in the README and these tests run one recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dare_gym.algorithms import list_algorithms
from dare_gym.compare import plan_comparison
from dare_gym.config import dataclass_from_dict
from dare_gym.trainer import Trainer, TrainConfig

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "compare_default.yaml"
STEPS = 10


@pytest.mark.parametrize("algorithm", list_algorithms())
def test_algorithm_raises_heldout_reward(algorithm, tmp_path):
    plan = plan_comparison([algorithm], [0], STEPS * 128, config_path=CONFIG, overrides=["eval_size=200"])
    assert not plan.config_errors, plan.config_errors
    settings = plan.run_config(algorithm, seed=0, output_dir=tmp_path)
    settings.update(eval_every=STEPS)
    summary = Trainer(dataclass_from_dict(TrainConfig, settings)).train()
    history = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    before = history[0]["heldout_reward"]
    after = [r for r in history if "heldout_reward" in r][-1]["heldout_reward"]
    assert after >= before + 0.015, f"{algorithm}: held-out reward {before:.3f} -> {after:.3f} in {STEPS} steps"
