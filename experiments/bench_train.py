"""One GRPO step of the default recipe, split into rollout / reward / update time.

    python experiments/bench_train.py              # writes experiments/results/train_step.json

Runs a few steps of `dare-gym train`'s default config (no evaluation, no checkpoints in the timed steps) and
reports the median seconds of each phase: sampling the completions, scoring them with the env's reward, and
the update (estimator passes for π_old/π_ref plus num_iterations optimizer steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from dare_gym.tools.cli import default_config_path
from dare_gym.core.config import load_config
from dare_gym.train.trainer import Trainer, TrainConfig

RESULTS = Path(__file__).parent / "results"
PHASES = ("time_rollout", "time_reward", "time_update")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--output", type=Path, default=RESULTS / "train_step.json")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, as for dare-gym train")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        config = load_config(TrainConfig, default_config_path(), [f"output_dir={workdir}", *args.overrides])
        trainer = Trainer(config)
        records = []
        for _ in range(args.steps + 1):
            buffer, stats = trainer.collect()
            stats.update(trainer.update(buffer))
            records.append(stats)
        records = records[1:]  # the first step pays one-off start-up costs
    medians = {phase: statistics.median(r.get(phase, 0.0) for r in records) for phase in PHASES}
    total = sum(medians.values())
    rows = config.prompts_per_step * config.group_size
    print(f"default recipe: {config.prompts_per_step} prompts x {config.group_size} completions = {rows} rollouts "
          f"per step, {trainer.algorithm.config.num_iterations} inner updates, {torch.get_num_threads()} threads")
    print("| phase | median seconds per step | share |\n|---|---|---|")
    for phase in PHASES:
        print(f"| {phase.removeprefix('time_')} | {medians[phase]:.3f} | {100 * medians[phase] / total:.0f}% |")
    print(f"| total | {total:.3f} | 100% |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"rollouts_per_step": rows, "threads": torch.get_num_threads(),
                                       "median_seconds": medians, "steps": records}, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
