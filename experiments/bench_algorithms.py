"""Per-algorithm cost: forward passes per sample per update, seconds per step, peak memory; and BGPO's peak
memory as its Monte-Carlo samples grow.

    python experiments/bench_algorithms.py                  # writes experiments/results/algorithms.json

Every measurement runs in a fresh process (peak memory = that process's peak resident set size, so runs do
not contaminate each other), on the tiny policy and digitsort-v0 with 16 prompts × 8 completions, each
algorithm at its paper defaults except the learning rate. "Forwards per sample per update" counts the rows
pushed through the model during scoring and updates, divided by (rows trained × inner iterations): what one
sample costs in forward passes for one update, π_old/π_ref scoring included.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _measure(algorithm: str, options: dict, steps: int, queue) -> None:
    import torch

    from dare_gym.core.config import load_config
    from dare_gym.train.trainer import TrainConfig, Trainer

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as workdir:
        overrides = [f"output_dir={workdir}", "prompts_per_step=16", "group_size=8", "progress=false",
                     f"algorithm={json.dumps({'name': algorithm, **options})}"]
        trainer = Trainer(load_config(TrainConfig, None, overrides))
        rows_forwarded = [0]
        logits = trainer.policy.logits

        def counting_logits(input_ids, attention_mask=None):
            rows_forwarded[0] += input_ids.shape[0]
            return logits(input_ids, attention_mask)

        trainer.policy.logits = counting_logits
        for reference in [trainer.reference] if trainer.reference is not None else []:
            reference_logits = reference.logits

            def counting_reference(input_ids, attention_mask=None, _f=reference_logits):
                rows_forwarded[0] += input_ids.shape[0]
                return _f(input_ids, attention_mask)

            reference.logits = counting_reference
        per_step, per_sample = [], []
        iterations = getattr(trainer.algorithm.config, "num_iterations", 1)
        for step in range(steps + 1):
            buffer, _ = trainer.collect()  # sampling forwards are not counted: every algorithm samples alike
            rows_forwarded[0] = 0
            start = time.perf_counter()
            stats = trainer.update(buffer)
            if step == 0:
                continue  # warm-up
            per_step.append(time.perf_counter() - start)
            trained = stats.get("rows_trained", 0)
            if trained:
                per_sample.append(rows_forwarded[0] / (trained * iterations))
    queue.put({
        "algorithm": algorithm, "options": options, "update_seconds": statistics.median(per_step),
        "forwards_per_sample_per_update": statistics.median(per_sample) if per_sample else None,
        "num_iterations": iterations, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    })


def measure(algorithm: str, options: dict, steps: int) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(algorithm, options, steps, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS / "algorithms.json")
    args = parser.parse_args()
    from dare_gym.algorithms import list_algorithms

    rows = []
    print("| algorithm | inner updates | forwards per sample per update | update seconds per step | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for name in list_algorithms():
        row = measure(name, {}, args.steps)
        rows.append(row)
        forwards = row["forwards_per_sample_per_update"]
        print(f"| {name} | {row['num_iterations']} | {forwards:.1f} | {row['update_seconds']:.2f} | "
              f"{row['peak_rss_mb']:.0f} |" if forwards is not None else f"| {name} | - | - | - | - |", flush=True)
    bgpo = []
    print("\n| BGPO Monte-Carlo samples | backward | update seconds | peak RSS (MB) |\n|---|---|---|---|")
    for samples in (4, 8, 16):
        for per_sample in (True, False):
            options = {"estimator_kwargs": {"mc_num": samples}, "per_sample_backward": per_sample}
            row = measure("bgpo", options, 2)
            row["mc_num"], row["per_sample_backward"] = samples, per_sample
            bgpo.append(row)
            print(f"| {samples} | {'per sample' if per_sample else 'all at once'} | {row['update_seconds']:.2f} | "
                  f"{row['peak_rss_mb']:.0f} |", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"algorithms": rows, "bgpo_memory": bgpo}, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
