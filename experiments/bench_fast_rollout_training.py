"""Do fast rollouts train as well as slow ones? Equal wall time, three rollout settings, several seeds.

    python experiments/bench_fast_rollout_training.py                    # 3 seeds x 3 settings, 2.5 min each
    python experiments/bench_fast_rollout_training.py --seeds 0 --minutes 1   # a quick look

The task where caching matters: ``tiny-long`` on ``groupsort-v0`` (67-token answers, 72 generated tokens in
blocks of 8). Every run starts from the same SFT checkpoint with the embedded recipe (d1's ``digitsort`` preset:
random-ratio estimator, μ 2, clip 0.2, β 0.04), 8 prompts × 4 completions per step at temperature 0.7, lr 1e-4,
and trains for the same wall time (``time_limit_minutes``); only the rollout differs:

* ``llada``: the LLaDA sampler, 72 steps (one token per step), no cache — the reference;
* ``fast_dllm``: Fast-dLLM's dual cache with parallel decoding at confidence threshold 0.9;
* ``fast_dllm + IS``: the same rollouts, trained with the trajectory estimator (each token scored in the state
  that committed it) and the truncated importance weight min(π_old / π_rollout, 2) (``rollout_is_cap``), which
  corrects for the approximate cache's log-probs.

Held-out: the first 100 test problems, greedy, scored before and after with the same evaluation sampler for all
(fast_dllm dual cache at threshold 0.9: on this task it decodes what the LLaDA sampler decodes, BENCHMARKS.md,
at a sixth of the time; evaluation time is counted in the wall time alike for every setting). Reported: held-out
character match (the reward) and exact accuracy before/after, steps trained, seconds per step, and the mean
``rollout_logp_gap`` (|log π_old − log π_rollout| of the committed tokens, logged where the trajectory estimator
runs). Writes experiments/results/fast_rollout_training.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dare_gym.core.config import load_config
from dare_gym.tools.cli import default_config_path
from dare_gym.train.trainer import Trainer, TrainConfig

RESULTS = Path(__file__).parent / "results"
FAST = {"sampler": "fast_dllm", "options": {"cache": "dual", "threshold": 0.9}}
SETTINGS = {
    "llada": {"rollout": {"temperature": 0.7}},
    "fast_dllm": {"rollout": {"temperature": 0.7, **FAST}},
    "fast_dllm + IS": {"rollout": {"temperature": 0.7, **FAST},
                       "algorithm": {"preset": "digitsort", "estimator": "trajectory", "estimator_kwargs": {},
                                     "rollout_is_cap": 2.0}},
}


def run(setting: str, seed: int, minutes: float, eval_size: int, workdir: Path) -> dict:
    options = {
        "policy": "tiny-long", "env": "groupsort-v0", "prompts_per_step": 8, "group_size": 4,
        "learning_rate": 1e-4, "seed": seed, "time_limit_minutes": minutes, "max_steps": 100_000,
        "eval_every": 100_000, "eval_size": eval_size, "save_every": 100_000, "progress": False, "log_samples": 0,
        "evaluation": {"temperature": 0.0, **FAST}, "stop_after_no_signal_steps": None,
        "output_dir": str(workdir / f"{setting.replace(' + ', '_')}-seed{seed}"),
        **SETTINGS[setting],
    }
    config = load_config(TrainConfig, default_config_path(), [f"{k}={json.dumps(v)}" for k, v in options.items()])
    summary = Trainer(config).train()
    history = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines() if line.strip()]
    evaluations = [r for r in history if "heldout_reward" in r]
    steps = [r for r in history if r.get("step", 0) > 0]
    gaps = [r["rollout_logp_gap"] for r in steps if "rollout_logp_gap" in r]
    return {
        "setting": setting, "seed": seed, "steps": summary["steps"], "elapsed_s": summary["elapsed_s"],
        "seconds_per_step": summary["elapsed_s"] / max(summary["steps"], 1),
        "reward_before": evaluations[0]["heldout_reward"], "reward_after": evaluations[-1]["heldout_reward"],
        "accuracy_before": evaluations[0]["heldout_accuracy"], "accuracy_after": evaluations[-1]["heldout_accuracy"],
        "rollout_logp_gap": statistics.fmean(gaps) if gaps else None,
        "rollout_is_weight": statistics.fmean(w) if (w := [r["rollout_is_weight"] for r in steps
                                                           if "rollout_is_weight" in r]) else None,
    }


def table(runs: list[dict]) -> str:
    lines = ["| rollout setting | seeds | steps (mean) | s / step | held-out char match before → after | gain "
             "(points, mean ± std) | exact accuracy after | rollout_logp_gap |",
             "|---|---|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        rows = [r for r in runs if r["setting"] == setting]
        if not rows:
            continue
        gains = [100 * (r["reward_after"] - r["reward_before"]) for r in rows]
        gaps = [r["rollout_logp_gap"] for r in rows if r["rollout_logp_gap"] is not None]
        mean = lambda key: statistics.fmean(r[key] for r in rows)  # noqa: E731
        lines.append(
            f"| {setting} | {len(rows)} | {mean('steps'):.1f} | {mean('seconds_per_step'):.2f} "
            f"| {mean('reward_before'):.4f} → {mean('reward_after'):.4f} "
            f"| {statistics.fmean(gains):+.2f} ± {statistics.pstdev(gains):.2f} | {mean('accuracy_after'):.3f} "
            f"| {f'{statistics.fmean(gaps):.4f}' if gaps else '—'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=2.5, help="wall time per run (default 2.5)")
    parser.add_argument("--eval-size", type=int, default=100)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench_fast_rollout_training"))
    parser.add_argument("--output", type=Path, default=RESULTS / "fast_rollout_training.json")
    args = parser.parse_args()
    runs, started = [], time.time()
    for seed in args.seeds:  # settings interleaved within a seed, so that a change of load hits all of them
        for setting in args.settings:
            result = run(setting, seed, args.minutes, args.eval_size, args.workdir)
            runs.append(result)
            print(f"{setting} seed {seed}: char match {result['reward_before']:.4f} -> {result['reward_after']:.4f}"
                  f", {result['steps']} steps, {result['seconds_per_step']:.2f} s/step", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"minutes": args.minutes, "threads": torch.get_num_threads(),
                                       "total_s": round(time.time() - started), "runs": runs}, indent=2) + "\n")
    print(table(runs))


if __name__ == "__main__":
    main()
