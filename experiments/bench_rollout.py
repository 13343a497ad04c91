"""Samplers: speed against accuracy, on the two embedded tasks, against the LLaDA sampler in the same run.

    python experiments/bench_rollout.py                # writes experiments/results/rollout.json
    python experiments/bench_rollout.py --quick        # a few prompts, to check that it runs
    python experiments/bench_rollout.py --compute-bound  # a real-format LLaDA at a compute-bound shape

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

``--compute-bound``: where the tiny policies' forwards cost mostly a fixed overhead per call, this suite's cost
is the model's arithmetic. A random LLaDA checkpoint in the real format (LLaDA-8B-Instruct's ``config.json``
with ``d_model`` 512, 4 heads of 128 as in the 8B model, MLP 3 × d_model as in the 8B model, ``--layers`` 24,
the real 126,464-token vocabulary, written by ``build_standin`` and loaded by ``load_policy``) decodes random
prompts greedily (prompt 32, batch 4; ``--gen``, ``--steps``, block 32) with ``llada`` and ``fast_dllm``'s
caches at LLaDA's schedule (no threshold, no early exit: the same model calls). For each setting the table
gives the model calls, the tokens fed to the body, the columns scored by the lm head, seconds (median), and

* the minimal compute: floating-point work of the body on every fed token (the linear layers and attention
  over the keys each query sees) plus the lm head on the columns that decide commits (the current block's
  masked columns), counted from the run itself;
* efficiency = (time of ``llada`` / time of the setting) / (minimal compute of ``llada`` / minimal compute of
  the setting): 1.0 when a setting turns all the compute it saves into time.

The completions' tokens are hashed, so two runs (before / after a change) show whether outputs moved.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
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


# ------------------------------------------------------------------------------------ the compute-bound suite

FAMILIES_DIR = Path(os.environ.get("DARE_GYM_FAMILIES_DIR", Path(__file__).parent.parent.parent / "shared" / "families"))
COMPUTE_BOUND_SIZES = dict(d_model=512, n_heads=4, n_kv_heads=4, mlp_hidden_size=1536)
COMPUTE_BOUND_SETTINGS = {
    "llada": ("llada", {}),
    "fast_dllm prefix cache": ("fast_dllm", dict(cache="prefix", threshold=None, early_exit=False)),
    "fast_dllm dual cache": ("fast_dllm", dict(cache="dual", threshold=None, early_exit=False)),
}


class CountingPolicy:
    """The policy with its forward counted: per call the rows, the tokens fed, the keys each query attends to
    (cached and fed), and the columns the lm head scored."""

    def __init__(self, policy):
        self.policy, self.calls = policy, []

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def logits(self, input_ids, attention_mask=None, **options):
        out = self.policy.logits(input_ids, attention_mask, **options)
        keys = attention_mask.shape[1] if attention_mask is not None else input_ids.shape[1]
        self.calls.append(dict(rows=input_ids.shape[0], fed=input_ids.shape[1], keys=keys, scored=out.shape[1]))
        return out


def body_flops_per_token(config) -> tuple[float, float]:
    """(linear-layer flops per token over all layers, attention flops per token per attended key over all
    layers) of a LLaDA "llama" block stack: 2 flops per weight; q·k and p·v cost 2·d each per key."""
    d, kv = config.d_model, config.n_kv_heads * (config.d_model // config.n_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * config.mlp_hidden_size  # q, o; k, v; gate, up, down
    return 2.0 * per_layer * config.n_layers, 4.0 * d * config.n_layers


def needed_columns(unmask_step: torch.Tensor, block_length: int) -> list[int]:
    """Per model call, the columns that decide commits: every row's masked columns of the call's block (a call
    commits in one block; the block of call c is where some token was committed at c)."""
    batch, gen = unmask_step.shape
    calls = int(unmask_step.max()) + 1
    block_of_call = torch.full((calls,), -1, dtype=torch.long)
    positions = torch.arange(gen).expand(batch, gen)
    block_of_call[unmask_step.flatten()] = (positions // block_length).flatten()
    counts = []
    for call in range(calls):
        block = int(block_of_call[call])
        window = unmask_step[:, block * block_length:(block + 1) * block_length]
        counts.append(int((window >= call).sum()))
    return counts


def compute_bound_suite(args) -> list[dict]:
    from dare_gym.models.standin import build_standin
    from dare_gym.samplers import get_sampler, make_options

    folder = Path(tempfile.gettempdir()) / f"dare_gym_llada_d512_l{args.layers}"
    if not (folder / "model.safetensors").is_file():
        build_standin("llada", folder, source=FAMILIES_DIR / "LLaDA-8B-Instruct",
                      sizes=dict(COMPUTE_BOUND_SIZES, n_layers=args.layers))
    policy = dare_gym.load_policy(folder)
    config = policy.model.config
    linear, attention = body_flops_per_token(config)
    head = 2.0 * config.d_model * config.padded_vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 1000, (args.batch_size, 32), generator=generator)
    mask = torch.ones_like(prompt)
    schedule = dict(gen_length=args.gen, steps=args.steps, block_length=32, temperature=0.0)

    def run(name: str):
        sampler, extra = COMPUTE_BOUND_SETTINGS[name]
        counting = CountingPolicy(policy)
        started, cpu_started = time.perf_counter(), time.process_time()
        out = get_sampler(sampler)(counting, prompt.clone(), mask, make_options(sampler, {**schedule, **extra}))
        return out, counting.calls, time.perf_counter() - started, time.process_time() - cpu_started

    records, walls, cpus = {}, {name: [] for name in COMPUTE_BOUND_SETTINGS}, {name: [] for name in COMPUTE_BOUND_SETTINGS}
    for repeat in range(args.repeats):
        for name in COMPUTE_BOUND_SETTINGS:
            out, calls, seconds, cpu_seconds = run(name)
            walls[name].append(seconds)
            cpus[name].append(cpu_seconds)
            print(f"  repeat {repeat}: {name} {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU", flush=True)
            records[name] = (out, calls)
    rows = []
    for name, (out, calls) in records.items():
        needed = needed_columns(out.unmask_step, 32)
        body = sum(c["rows"] * c["fed"] * (linear + attention * c["keys"]) for c in calls)
        minimal = body + head * sum(needed)
        rows.append({"setting": name, "model_calls": out.model_calls, "tokens_fed": sum(c["rows"] * c["fed"] for c in calls),
                     "columns_scored": sum(c["rows"] * c["scored"] for c in calls), "columns_needed": sum(needed),
                     "seconds": statistics.median(cpus[name] if args.cpu_time else walls[name]),
                     "wall_seconds": walls[name], "cpu_seconds": cpus[name],
                     "minimal_gflop": minimal / 1e9,
                     "completion_sha": hashlib.sha256(str(out.completion_ids.tolist()).encode()).hexdigest()[:12]})
    base = rows[0]
    for row in rows:
        row["time_ratio"] = base["seconds"] / row["seconds"]
        row["compute_ratio"] = base["minimal_gflop"] / row["minimal_gflop"]
        row["efficiency"] = row["time_ratio"] / row["compute_ratio"]
        # what the scored columns cost beyond the needed ones, as a share of the setting's minimal compute
        row["head_waste"] = head * (row["columns_scored"] - row["columns_needed"]) / 1e9 / row["minimal_gflop"]
    return rows


def print_compute_bound(rows: list[dict], args) -> None:
    print(f"LLaDA stand-in d_model 512, {args.layers} layers, vocab 126,464; prompt 32, gen {args.gen}, block 32, "
          f"{args.steps} steps, batch {args.batch_size}, greedy; {torch.get_num_threads()} thread(s); median of "
          f"{args.repeats} {'CPU' if args.cpu_time else 'wall'} times")
    print("| setting | model calls | tokens fed | columns scored (needed) | s | time ratio | minimal GFLOP "
          "| compute ratio | efficiency | completions |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['model_calls']} | {r['tokens_fed']:,} | {r['columns_scored']:,} "
              f"({r['columns_needed']:,}) | {r['seconds']:.1f} | {r['time_ratio']:.2f}× | {r['minimal_gflop']:,.0f} | "
              f"{r['compute_ratio']:.2f}× | **{r['efficiency']:.2f}** | `{r['completion_sha']}` |", flush=True)


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
    parser.add_argument("--output", type=Path, help="default: experiments/results/rollout.json, or "
                                                     "rollout_compute_bound.json with --compute-bound")
    parser.add_argument("--compute-bound", action="store_true",
                        help="the real-format LLaDA stand-in at a compute-bound shape instead of the tiny policies")
    parser.add_argument("--layers", type=int, default=24, help="--compute-bound: decoder layers")
    parser.add_argument("--gen", type=int, default=128, help="--compute-bound: gen_length (a multiple of 32)")
    parser.add_argument("--steps", type=int, default=128, help="--compute-bound: denoising steps in all")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="--compute-bound: time by the process's CPU seconds, not wall seconds (with --threads 1 "
                             "on a shared machine: other jobs then slow the run without changing its numbers)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compute_bound:
        if args.batch_size == 50:
            args.batch_size = 4
        args.output = args.output or RESULTS / "rollout_compute_bound.json"
        print(f"{torch.get_num_threads()} threads")
        rows = compute_bound_suite(args)
        print_compute_bound(rows, args)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"threads": torch.get_num_threads(), "layers": args.layers, "gen": args.gen,
                                           "steps": args.steps, "batch_size": args.batch_size,
                                           "repeats": args.repeats, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.output}")
        return
    args.output = args.output or RESULTS / "rollout.json"
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
