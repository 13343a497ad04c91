"""How much the old timing of `dare-gym compare` understated seconds per step, on a small real comparison.

A metrics record's ``elapsed_s`` is taken before that step's own evaluation. The old report subtracted every
evaluation up to and including the record's own, so a run's first evaluated point read 0.0 s and its
seconds per step came out one evaluation short; the report now subtracts only the earlier ones.

    python experiments/bench_compare_timing.py [--algorithms d1 reinforce] [--budget-rollouts 1280]

Prints a table (old vs corrected training seconds and seconds per step, per run) and writes
experiments/results/compare_timing.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from dare_gym.tools.compare import run_comparison

ROOT = Path(__file__).resolve().parents[1]


def old_train_seconds(records: list[dict]) -> list[float]:
    """The previous formula: each evaluated record's elapsed_s less every evaluation up to and including it."""
    spent, seconds = 0.0, []
    for record in records:
        spent += record.get("time_eval", 0.0)
        if "heldout_accuracy" in record:
            seconds.append(0.0 if record["step"] == 0 else max(0.0, record["elapsed_s"] - spent))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=["d1", "reinforce"])
    parser.add_argument("--budget-rollouts", type=int, default=1280)
    parser.add_argument("--output", type=Path, default=ROOT / "experiments" / "results" / "compare_timing.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        report = run_comparison(
            args.algorithms, [0], args.budget_rollouts, config_path=ROOT / "experiments/configs/compare_default.yaml",
            overrides=["torch_threads=2"], output_dir=workdir, echo=lambda line: None,
        )
        for run in report["runs"]:
            records = [json.loads(line) for line in
                       (Path(run["run_dir"]) / "train" / "metrics.jsonl").read_text().splitlines()]
            old = old_train_seconds(records)
            rows.append({
                "algorithm": run["algorithm"], "steps": run["steps"],
                "evaluations": sum("time_eval" in r for r in records),
                "eval_seconds": run["eval_seconds"],
                "first_point_old_s": old[1], "first_point_new_s": run["curve"][1]["train_seconds"],
                "seconds_per_step_old": round(old[-1] / run["steps"], 3),
                "seconds_per_step_new": run["seconds_per_step"],
            })
    print("| algorithm | steps | evals | eval s | 1st point s (old → new) | s/step (old → new) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['algorithm']} | {row['steps']} | {row['evaluations']} | {row['eval_seconds']:.1f} | "
              f"{row['first_point_old_s']:.2f} → {row['first_point_new_s']:.2f} | "
              f"{row['seconds_per_step_old']:.3f} → {row['seconds_per_step_new']:.3f} |")
    args.output.write_text(json.dumps({"budget_rollouts": args.budget_rollouts, "runs": rows}, indent=1) + "\n")
    print(f"\nwritten: {args.output}")


if __name__ == "__main__":
    main()
