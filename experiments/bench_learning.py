"""The learning claim, in full: the default `dare-gym train` recipe raises held-out greedy accuracy of the tiny
model over its SFT starting point, from the checker alone, over several seeds; beside it, continued SFT on
gold labels for the same wall time (SFT sees the answers, so it is expected to win; the point is that RL
learns without them).

    python experiments/bench_learning.py                      # 3 seeds, the default time limit (5 min)
    python experiments/bench_learning.py --seeds 0 --minutes 1   # a quick look

Writes experiments/results/learning.json and learning.png, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import dare_gym
from dare_gym.tools.cli import default_config_path
from dare_gym.core.config import load_config
from dare_gym.train.evaluation import evaluate
from dare_gym.core.sft import train_on_demonstrations
from dare_gym.train.trainer import Trainer, TrainConfig

RESULTS = Path(__file__).parent / "results"


def run_rl(seed: int, minutes: float, workdir: Path) -> dict:
    config = load_config(TrainConfig, default_config_path(), [
        f"seed={seed}", f"time_limit_minutes={minutes}", f"output_dir={workdir / f'rl-seed{seed}'}",
        "progress=false",
    ])
    trainer = Trainer(config)
    summary = trainer.train()
    history = [json.loads(line) for line in Path(summary["metrics"]).read_text().splitlines()]
    curve = [(r["elapsed_s"], r["heldout_accuracy"]) for r in history if "heldout_accuracy" in r]
    return {"seed": seed, "steps": summary["steps"], "seconds": summary["elapsed_s"], "curve": curve,
            "before": summary["heldout_accuracy_before"], "after": summary["heldout_accuracy_after"],
            "eval_size": config.eval_size}


def run_sft(seed: int, seconds: float, eval_size: int, eval_every_s: float = 15.0) -> dict:
    """Continued masked-diffusion SFT on gold answers from the same starting checkpoint."""
    torch.manual_seed(seed)
    policy = dare_gym.load_policy("tiny")
    train_env, test_env = dare_gym.make("digitsort-v0"), dare_gym.make("digitsort-v0", split="test")

    def accuracy() -> float:
        return evaluate(policy, test_env, limit=eval_size).accuracy

    curve = [(0.0, accuracy())]
    next_eval = [eval_every_s]

    def on_step(step: int, elapsed: float, loss: float) -> None:
        if elapsed >= next_eval[0]:
            curve.append((round(elapsed, 2), accuracy()))
            next_eval[0] += eval_every_s

    steps = train_on_demonstrations(
        policy, train_env, answer_length=policy.generation_defaults["gen_length"], learning_rate=1e-4,
        batch_size=64, seconds=seconds, generator=torch.Generator().manual_seed(seed), callback=on_step,
        progress=False,
    )
    final = accuracy()
    if curve[-1][0] < seconds - 1e-6:
        curve.append((round(seconds, 2), final))
    return {"seed": seed, "steps": steps, "curve": curve, "before": curve[0][1], "after": final}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name, color in (("rl", "tab:blue"), ("sft", "tab:orange")):
        runs = results[name]
        horizon = min(r["curve"][-1][0] for r in runs)
        grid = np.linspace(0, horizon, 60)
        curves = np.array([np.interp(grid, *zip(*r["curve"])) for r in runs])
        mean, std = curves.mean(0), curves.std(0)
        label = "d1 from the checker alone" if name == "rl" else "continued SFT on gold labels"
        axis.plot(grid, mean, color=color, label=f"{label} (mean of {len(runs)} seeds)")
        axis.fill_between(grid, mean - std, mean + std, color=color, alpha=0.2)
        for run in runs:
            axis.plot(*zip(*run["curve"]), color=color, alpha=0.35, lw=0.8)
    axis.set_xlabel("wall-clock seconds (2 CPU cores)")
    axis.set_ylabel("held-out greedy accuracy")
    axis.set_title("digitsort-v0, tiny dLLM from its SFT checkpoint")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=None, help="time limit per run (default: the config's)")
    parser.add_argument("--no-sft", action="store_true", help="skip the continued-SFT baseline")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench_learning"))
    parser.add_argument("--output", type=Path, default=RESULTS / "learning.json")
    args = parser.parse_args()
    minutes = args.minutes or load_config(TrainConfig, default_config_path()).time_limit_minutes
    results: dict = {"minutes": minutes, "threads": torch.get_num_threads(), "rl": [], "sft": []}
    started = time.time()
    for seed in args.seeds:
        rl = run_rl(seed, minutes, args.workdir)
        results["rl"].append(rl)
        print(f"RL  seed {seed}: {rl['before']:.3f} -> {rl['after']:.3f} in {rl['steps']} steps, {rl['seconds']:.0f} s",
              flush=True)
        if not args.no_sft:
            sft = run_sft(seed, rl["seconds"], rl["eval_size"])
            results["sft"].append(sft)
            print(f"SFT seed {seed}: {sft['before']:.3f} -> {sft['after']:.3f} in {sft['steps']} steps", flush=True)
    results["total_seconds"] = round(time.time() - started)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    print("\n| method | seeds | held-out accuracy before | after | gain (points) |\n|---|---|---|---|---|")
    for name in ("rl", "sft"):
        runs = results[name]
        if not runs:
            continue
        before = np.mean([r["before"] for r in runs])
        after = np.array([r["after"] for r in runs])
        gains = 100 * (after - np.array([r["before"] for r in runs]))
        label = "d1 (default recipe)" if name == "rl" else "continued SFT, same wall time"
        print(f"| {label} | {len(runs)} | {before:.3f} | {after.mean():.3f} ± {after.std():.3f} | "
              f"{gains.mean():+.1f} ({', '.join(f'{g:+.1f}' for g in gains)}) |")
    if results["sft"]:
        plot(results, args.output.with_suffix(".png"))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
