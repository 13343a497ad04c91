"""Sampler throughput and overhead over the model's own forward passes.

    python experiments/bench_sampler_overhead.py   # writes experiments/results/sampler_overhead.json

overhead = sampler wall time / (number of forward passes × time of one forward) − 1: the share of sampling
time spent outside the model (scoring, choosing and committing tokens). The forwards are timed inside the
same sampler run (median over repeats of the per-run ratio), because this shared machine's speed drifts
between separate measurements; the ratio against a separately timed forward is reported beside it.
tokens/s counts generated tokens (``gen_length`` per row) per second of sampler wall time.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import dare_gym
from dare_gym.samplers.llada import denoise_blocks

RESULTS = Path(__file__).parent / "results"
SETTINGS = {
    "default (gen 8, 8 steps, 1 block)": dict(gen_length=8, steps=8, block_length=8),
    "long (gen 64, 64 steps, 2 blocks)": dict(gen_length=64, steps=64, block_length=32),
}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


@torch.no_grad()
def measure(policy, batch_size: int, settings: dict, temperature: float, repeats: int) -> dict:
    prompts = [f"sort {i % 1000000:06d}\n" for i in range(batch_size)]
    prompt_ids, prompt_mask = policy.encode_prompts(prompts)
    generator = torch.Generator().manual_seed(0)
    in_model = [0.0]

    def timed_logits(ids, mask, **options):  # logits_to_keep: the sampler keeps only the columns it decodes
        start = time.perf_counter()
        out = policy.logits(ids, mask, **options)
        in_model[0] += time.perf_counter() - start
        return out

    timed = copy.copy(policy)  # the same policy, its forward timed
    timed.logits = timed_logits

    def sample():
        return denoise_blocks(timed, prompt_ids, prompt_mask, generator=generator, temperature=temperature,
                              remasking="low_confidence", record_predictions=False, **settings)

    out = sample()  # warm-up, and the number of forward passes
    # Each repeat times the sampler and, inside the same run, its forward passes: the ratio of the two is
    # immune to the machine getting slower or faster between measurements.
    ratios, walls = [], []
    for _ in range(repeats):
        in_model[0] = 0.0
        start = time.perf_counter()
        sample()
        walls.append(time.perf_counter() - start)
        ratios.append(walls[-1] / in_model[0])
    full_ids = torch.cat([prompt_ids, out.completion_ids], dim=1)
    full_mask = torch.cat([prompt_mask, torch.ones_like(out.completion_ids)], dim=1)
    forward = median_time(lambda: policy.logits(full_ids, full_mask), repeats * 3)
    end_to_end = median_time(lambda: policy.generate(prompts, temperature=temperature, seed=0, **settings), repeats)
    sampler = sorted(walls)[len(walls) // 2]
    return {
        "batch_size": batch_size,
        "forward_passes": out.num_forward_passes,
        "forward_ms": 1000 * forward,
        "sampler_s": sampler,
        "generate_s": end_to_end,
        "tokens_per_s": batch_size * settings["gen_length"] / sampler,
        "overhead": sorted(ratios)[len(ratios) // 2] - 1,
        "overhead_vs_standalone_forward": sampler / (out.num_forward_passes * forward) - 1,
        "generate_overhead": end_to_end / (out.num_forward_passes * forward) - 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path, default=RESULTS / "sampler_overhead.json")
    args = parser.parse_args()
    policy = dare_gym.load_policy("tiny")
    policy.model.eval()
    rows = []
    print(f"tiny dLLM, {torch.get_num_threads()} threads, temperature {args.temperature}")
    print("| setting | batch | forwards | forward (ms) | sampler (s) | tokens/s | sampler overhead | vs separate forward | generate() |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, settings in SETTINGS.items():
        for batch_size in args.batch_sizes:
            row = {"setting": name, **settings, **measure(policy, batch_size, settings, args.temperature, args.repeats)}
            rows.append(row)
            print(f"| {name} | {batch_size} | {row['forward_passes']} | {row['forward_ms']:.2f} | {row['sampler_s']:.3f} | "
                  f"{row['tokens_per_s']:,.0f} | {100 * row['overhead']:.1f}% | {100 * row['overhead_vs_standalone_forward']:.1f}% | "
                  f"{100 * row['generate_overhead']:.1f}% |",
                  flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"threads": torch.get_num_threads(), "temperature": args.temperature,
                                       "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
