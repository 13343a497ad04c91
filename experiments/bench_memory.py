"""Peak memory of one update for a 1.3B-shaped LLaDA model (126k vocabulary) on CPU, at a small batch.

Each configuration runs in a fresh process (CPU peak memory is a process-wide high-water mark): build the random
model, record the resident memory, run one d1 update (β = 0.04 against the adapter-disabled base, LoRA r = 8,
μ = 1) on synthetic rollouts, record the peak resident memory and, exactly, the bytes autograd saves for
the backward (the activation memory these options change; resident memory also moves with the allocator).
Configurations:

* ``previous log-probs``: the code path before this change, restored for the measurement: logits over the whole
  sequence and a full-vocabulary float32 log-softmax for the entropy;
* ``chunked log-probs``: logits only at the completion's positions (``logits_to_keep``), log-probs and entropy in
  float32 chunks (:mod:`dare_gym.core.logprobs`);
* ``+ gradient checkpointing``: the same with activation checkpointing of every block.

    python experiments/bench_memory.py            # ~10 min on 2 CPU cores; writes experiments/results/memory.json
    python experiments/bench_memory.py --shape test --rows 2   # seconds, for a smoke test
    python experiments/bench_memory.py --shape test --dtype bfloat16 --output experiments/results/memory_bf16.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from update_probe import SHAPES, one_update, parameter_count, random_llada  # noqa: E402

from dare_gym.core.lora import LoraSettings  # noqa: E402

CONFIGURATIONS = {
    "previous log-probs": dict(previous=True, checkpointing=False),
    "chunked log-probs": dict(previous=False, checkpointing=False),
    "+ gradient checkpointing": dict(previous=False, checkpointing=True),
}


def _previous_forward(logits_fn, batch, completion, prompt=None):
    """The estimators' forward before this change: logits at every position, then a full log-softmax."""
    prompt = batch.prompt_ids if prompt is None else prompt
    logits = logits_fn(torch.cat([prompt, completion], dim=1), batch.attention_mask)[:, batch.prompt_length:]
    with torch.no_grad():
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    logp = logits.float().gather(-1, batch.completion_ids[..., None]).squeeze(-1) - torch.logsumexp(logits.float(), -1)
    return logp, entropy


def measure(name: str, shape: str, rows: int, prompt_length: int, gen_length: int, dtype: str) -> dict:
    setting = CONFIGURATIONS[name]
    if setting["previous"]:
        import dare_gym.core.estimators

        dare_gym.core.estimators._forward = _previous_forward
    policy = random_llada(shape, device="cpu", dtype=getattr(torch, dtype))
    weights_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = one_update(policy, rows=rows, prompt_length=prompt_length, gen_length=gen_length, group_size=rows,
                        micro_batch_size=rows, lora=LoraSettings(r=8, alpha=16),
                        gradient_checkpointing=setting["checkpointing"])
    return dict(configuration=name, shape=shape, dtype=dtype, parameters=parameter_count(policy), rows=rows,
                prompt_length=prompt_length, gen_length=gen_length, weights_rss_mb=weights_rss / 2**20,
                peak_rss_mb=result["peak_bytes"] / 2**20,
                update_mb=(result["peak_bytes"] - weights_rss) / 2**20, seconds=result["seconds"], loss=result["loss"],
                saved_for_backward_mb=result["saved_for_backward_bytes"] / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1.3b", choices=sorted(SHAPES))
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights and forward (bfloat16 on CPU is slow: use a small shape)")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "memory.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one configuration, print JSON
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.one:
        print(json.dumps(measure(args.one, args.shape, args.rows, args.prompt_length, args.gen_length, args.dtype)))
        return
    results = []
    for name in CONFIGURATIONS:
        command = [sys.executable, __file__, "--one", name, "--shape", args.shape, "--rows", str(args.rows),
                   "--prompt-length", str(args.prompt_length), "--gen-length", str(args.gen_length),
                   "--dtype", args.dtype]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name}: the measurement failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        row = results[-1]
        print(f"{name:26s} saved for backward {row['saved_for_backward_mb']:7.0f} MB  peak RSS "
              f"{row['peak_rss_mb']:7.0f} MB (weights {row['weights_rss_mb']:.0f})  {row['seconds']:6.1f} s", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| configuration | saved for backward MB | peak RSS MB | above the weights MB | seconds |\n"
          "|---|---|---|---|---|")
    for row in results:
        print(f"| {row['configuration']} | {row['saved_for_backward_mb']:.0f} | {row['peak_rss_mb']:.0f} | "
              f"{row['update_mb']:.0f} | {row['seconds']:.1f} |")
    print(f"\n{results[0]['parameters']:,} parameters in {args.dtype}, {args.rows} rows, prompt {args.prompt_length}, "
          f"gen {args.gen_length}; saved {args.output}")


if __name__ == "__main__":
    main()
