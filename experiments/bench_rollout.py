"""Samplers: speed against accuracy, on the two embedded tasks, against the LLaDA sampler in the same run.

    python experiments/bench_rollout.py                # writes experiments/results/rollout.json
    python experiments/bench_rollout.py --quick        # a few prompts, to check that it runs

For each built-in policy and task, every sampler setting decodes the same held-out prompts greedily
(temperature 0), in batches of ``--batch-size``, and the table gives:

* model calls per batch and query tokens processed (what caches and parallel decoding cut);
* tokens/s: generated tokens (``gen_length`` per row, EOS padding included, the same for every setting) per
  second of wall time, and the speed-up over the baseline row (the LLaDA sampler, one token per step; for the
  block-causal policy, SDAR's static rule with one token per step);
* exact-match accuracy and mean character match (the tasks' reward) on the same prompts, and the change in
  points against the baseline.

Every setting of one policy runs interleaved, repeat by repeat, so that this shared machine's drifting speed
falls on all of them alike; the time of a setting is its median over repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import dare_gym

RESULTS = Path(__file__).parent / "results"

SHORT = dict(gen_length=8, steps=8, block_length=8)  # the default task's schedule
LONG = dict(gen_length=72, steps=72, block_length=8)  # the long task's: one token per step, blocks of 8
BLOCK = dict(sampler="block_diffusion", gen_length=72)  # the block-causal policy's own blocks of 4


def fast(schedule: dict, cache: str, threshold: float | None = None, **rule) -> dict:
    return dict(sampler="fast_dllm", **schedule, cache=cache, threshold=threshold, **rule)


# policy, env, baseline settings, then the settings compared against it
SUITES = [
    {
        "name": "digit sort (gen 8)",
        "policy": "tiny",
        "env": "digitsort-v0",
        "prompts": 500,
        "settings": {
            "llada (8 steps)": dict(sampler="llada", **SHORT),
            "fast_dllm threshold 0.9, no cache": fast(SHORT, "none", 0.9),
            "fast_dllm threshold 0.9, dual cache": fast(SHORT, "dual", 0.9),
            "fast_dllm threshold 0.7, dual cache": fast(SHORT, "dual", 0.7),
        },
    },
    {
        "name": "group sort (gen 72)",
        "policy": "tiny-long",
        "env": "groupsort-v0",
        "prompts": 100,
        "settings": {
            "llada (72 steps, block 8)": dict(sampler="llada", **LONG),
            "fast_dllm prefix cache": fast(LONG, "prefix"),
            "fast_dllm dual cache": fast(LONG, "dual"),
            "fast_dllm threshold 0.9, no cache": fast(LONG, "none", 0.9),
            "fast_dllm threshold 0.9, prefix cache": fast(LONG, "prefix", 0.9),
            "fast_dllm threshold 0.9, dual cache": fast(LONG, "dual", 0.9),
            "fast_dllm threshold 0.7, dual cache": fast(LONG, "dual", 0.7),
            "fast_dllm factor 1.0, dual cache": fast(LONG, "dual", factor=1.0),
        },
    },
    {
        "name": "group sort, block-causal (gen 72, blocks of 4)",
        "policy": "tiny-block",
        "env": "groupsort-v0",
        "prompts": 100,
        "settings": {
            "block_diffusion static, 4 steps/block": dict(**BLOCK, steps_per_block=4,
                                                          remasking_strategy="low_confidence_static"),
            "block_diffusion static, 2 steps/block": dict(**BLOCK, steps_per_block=2,
                                                          remasking_strategy="low_confidence_static"),
            "block_diffusion dynamic 0.9, 4 steps/block": dict(**BLOCK, steps_per_block=4, threshold=0.9,
                                                               remasking_strategy="low_confidence_dynamic"),
            "block_diffusion dynamic 0.7, 4 steps/block": dict(**BLOCK, steps_per_block=4, threshold=0.7,
                                                               remasking_strategy="low_confidence_dynamic"),
        },
    },
]


def char_match(text: str, gold: str) -> float:
    """The share of the gold answer's characters in place (the tasks' ``char_match`` reward)."""
    return sum(a == b for a, b in zip(text.strip(), gold)) / len(gold)


def decode(policy, prompts: list[str], settings: dict, batch_size: int) -> tuple[list, dict, float]:
    options = dict(settings, temperature=0.0)
    sampler = options.pop("sampler")
    start = time.perf_counter()
    completions, stats = policy.generate(prompts, sampler=sampler, batch_size=batch_size, return_stats=True,
                                         **options)
    return completions, stats, time.perf_counter() - start


def run_suite(suite: dict, *, prompts_limit: int | None, batch_size: int, repeats: int) -> list[dict]:
    policy = dare_gym.load_policy(suite["policy"])
    env = dare_gym.make(suite["env"], split="test")
    count = min(suite["prompts"], prompts_limit or suite["prompts"])
    records = [env.record(i) for i in range(count)]
    prompts = [env.prompt(r) for r in records]
    golds = [r["gold"] for r in records]
    batches = -(-count // batch_size)
    results: dict[str, dict] = {}
    walls: dict[str, list[float]] = {name: [] for name in suite["settings"]}
    for name, settings in suite["settings"].items():  # warm-up, and the outputs (greedy: the same every repeat)
        completions, stats, _ = decode(policy, prompts, settings, batch_size)
        results[name] = {
            "model_calls_per_batch": stats["model_calls"] / batches,
            "tokens_processed": stats["tokens_processed"],
            "accuracy": sum(c.text.strip() == g for c, g in zip(completions, golds)) / count,
            "char_match": sum(char_match(c.text, g) for c, g in zip(completions, golds)) / count,
        }
    for _ in range(repeats):
        for name, settings in suite["settings"].items():
            walls[name].append(decode(policy, prompts, settings, batch_size)[2])
    rows = []
    baseline = None
    for name, settings in suite["settings"].items():
        seconds = statistics.median(walls[name])
        tokens = count * settings["gen_length"]
        row = {"suite": suite["name"], "policy": suite["policy"], "env": suite["env"], "setting": name,
               "settings": settings, "prompts": count, "batch_size": batch_size, "seconds": seconds,
               "tokens_per_s": tokens / seconds, **results[name]}
        baseline = baseline or row
        row["speedup"] = row["tokens_per_s"] / baseline["tokens_per_s"]
        row["accuracy_change_points"] = 100 * (row["accuracy"] - baseline["accuracy"])
        row["char_match_change_points"] = 100 * (row["char_match"] - baseline["char_match"])
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print("| policy / task | sampler setting | model calls / batch | tokens/s | speed-up | exact | char match "
          "| Δ char match (points) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['policy']} / {row['env']} | {row['setting']} | {row['model_calls_per_batch']:.1f} | "
              f"{row['tokens_per_s']:,.0f} | {row['speedup']:.2f}× | {100 * row['accuracy']:.1f}% | "
              f"{100 * row['char_match']:.1f}% | {row['char_match_change_points']:+.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of every setting (median)")
    parser.add_argument("--prompts", type=int, help="at most this many prompts per task (default: each suite's)")
    parser.add_argument("--quick", action="store_true", help="8 prompts, 1 repeat: checks that everything runs")
    parser.add_argument("--output", type=Path, default=RESULTS / "rollout.json")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.repeats = 8, 1
    print(f"{torch.get_num_threads()} threads, batch {args.batch_size}, median of {args.repeats} repeats")
    rows = []
    for suite in SUITES:
        suite_rows = run_suite(suite, prompts_limit=args.prompts, batch_size=args.batch_size, repeats=args.repeats)
        print_table(suite_rows)
        rows += suite_rows
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"threads": torch.get_num_threads(), "batch_size": args.batch_size,
                                       "repeats": args.repeats, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
