"""One GPU check, one command: what a lent GPU must show, in about 5 minutes on one H100 or H200.

    python experiments/gpu_check.py                       # on the GPU machine; writes experiments/results/gpu_check/
    python experiments/gpu_check.py --device cpu --quick  # the same code path on CPU with tiny shapes (CI runs it)

1. The tiny policy's greedy rollouts on the device equal the CPU's (float32).
2. The embedded default recipe trains 20 steps on the device and gains held-out accuracy.
3. Samplers on random LLaDA-architecture models of 1.3B and 8B shape in bf16 (prompt 64, gen 256, block 32,
   256 steps; batch 8 and 32): tokens/s, model calls, and the sampler's overhead over its own forward passes
   (its wall time over calls × one full forward), for ``llada`` and ``fast_dllm`` (dual cache, and dual cache
   with threshold 0.9); columns the lm head scored, and for LLaDA's schedule the time ratio over the minimal-
   compute ratio against ``llada`` (``bench_rollout.py --compute-bound``'s efficiency).
4. One d1 update of the 8B-shaped model (8 rows, prompt 64, gen 256): time and peak memory with LoRA (r = 8)
   and with full fine-tuning plus gradient checkpointing (β = 0, so no reference copy); where it does not fit the
   card, where it ran out.
5. ``torch_compile``: the 1.3B shape's ``llada`` and dual-cache decodes (batch 8) eager and compiled, the
   compilation's cost, and whether the tokens stayed the same.
6. LLaDA2 (MoE, block diffusion) at LLaDA2.0-mini's width, random, with ``--llada2-layers`` decoder layers (20: the
   whole 16B model, 32.5 GB in bf16): the ``block_diffusion`` sampler's speed (prompt 64, gen 256, blocks of 32,
   32 steps a block, batch 8), and one EBPO update under LoRA (r = 8) with gradient checkpointing (4 rows): time,
   peak memory, and the peak that ``experiments/llada2_memory.py`` counts for it from the config.

Every part records its error and the check goes on, so one failure loses nothing else. Results: ``gpu_check.json``
and ``gpu_check.md`` (a Markdown table naming the card).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_rollout import CountingPolicy, body_flops_per_token, needed_columns  # noqa: E402
from update_probe import one_update, parameter_count, random_llada, random_llada2  # noqa: E402

import dare_gym  # noqa: E402
from dare_gym.core.device import resolve_device  # noqa: E402
from dare_gym.core.lora import LoraSettings  # noqa: E402
from dare_gym.samplers import get_sampler, make_options  # noqa: E402

SAMPLER_SETTINGS = {  # name -> (sampler, its options beyond the shared schedule)
    "llada": ("llada", {}),
    "fast_dllm dual cache": ("fast_dllm", {"cache": "dual", "threshold": None, "early_exit": False}),
    "fast_dllm dual cache + threshold 0.9": ("fast_dllm", {"cache": "dual", "threshold": 0.9, "early_exit": False}),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB)"
    return "CPU"


def part(results: dict, name: str, function, *args) -> None:
    """Run one part of the check; record its result or its error, and go on."""
    started = time.perf_counter()
    try:
        results[name] = function(*args)
    except Exception as error:  # noqa: BLE001 - a failing part is reported, the others still run
        results[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-2000:]}
    results[name]["seconds"] = round(time.perf_counter() - started, 1)
    print(f"[{name}] {json.dumps({k: v for k, v in results[name].items() if k != 'traceback'})[:400]}", flush=True)


def tiny_parity(device: torch.device, quick: bool) -> dict:
    env = dare_gym.make("digitsort-v0", split="test")
    prompts = [env.reset(options={"index": i})[0] for i in range(8 if quick else 64)]
    cpu = dare_gym.load_policy("tiny", device="cpu").generate(prompts, temperature=0.0)
    here = dare_gym.load_policy("tiny", device=device).generate(prompts, temperature=0.0)
    same = sum(a.completion_ids.tolist() == b.completion_ids.tolist() for a, b in zip(cpu, here))
    return {"prompts": len(prompts), "identical": same, "all_identical": same == len(prompts)}


def tiny_training(device: torch.device, quick: bool) -> dict:
    from dare_gym.core.config import load_config
    from dare_gym.train.trainer import TrainConfig, Trainer

    steps = 1 if quick else 20
    size = ["prompts_per_step=4", "group_size=4", "eval_size=16"] if quick else ["eval_size=500"]
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(TrainConfig, None, [
            f"device={device}", f"max_steps={steps}", "time_limit_minutes=null", f"eval_every={steps}",
            f"output_dir={folder}", "progress=false", f"save_every={steps}", *size])
        summary = Trainer(config).train()
    return {"steps": summary["steps"], "elapsed_s": summary["elapsed_s"],
            "heldout_accuracy_before": summary["heldout_accuracy_before"],
            "heldout_accuracy_after": summary["heldout_accuracy_after"]}


def sampler_speed(device: torch.device, shape: str, batches: list[int], schedule: dict) -> dict:
    policy = random_llada(shape, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    prompt_length, gen_length = schedule["prompt_length"], schedule["gen_length"]
    linear, attention = body_flops_per_token(policy.model.config)
    head = 2.0 * policy.model.config.d_model * policy.model.config.padded_vocab_size
    generator = torch.Generator(device=device).manual_seed(0)
    rows = []
    for batch in batches:
        prompt = torch.randint(0, 100_000, (batch, prompt_length), device=device, generator=generator)
        mask = torch.ones_like(prompt)
        full = torch.cat([prompt, torch.full((batch, gen_length), policy.mask_token_id, device=device)], dim=1)
        with torch.no_grad():
            policy.logits(full, torch.ones_like(full))  # warm-up
            synchronize(device)
            started = time.perf_counter()
            repeats = 3
            for _ in range(repeats):
                policy.logits(full, torch.ones_like(full))
            synchronize(device)
        forward_s = (time.perf_counter() - started) / repeats
        for label, (name, extra) in SAMPLER_SETTINGS.items():
            options = make_options(name, {"gen_length": gen_length, "steps": schedule["steps"],
                                          "block_length": schedule["block_length"], "temperature": 0.0, **extra})
            counting = CountingPolicy(policy)  # counts what each call fed and scored (outside the timed forward)
            synchronize(device)
            started = time.perf_counter()
            out = get_sampler(name)(counting, prompt, mask, options, generator=generator)
            synchronize(device)
            seconds = time.perf_counter() - started
            # minimal compute: the body on every fed token + the lm head on the columns that decide commits
            needed = needed_columns(out.unmask_step.cpu(), schedule["block_length"]) if extra.get("threshold") is None \
                else None
            minimal = None if needed is None else 1e-9 * (
                sum(c["rows"] * c["fed"] * (linear + attention * c["keys"]) for c in counting.calls) + head * sum(needed))
            rows.append({"batch": batch, "sampler": label, "seconds": round(seconds, 3), "model_calls": out.model_calls,
                         "tokens_per_s": round(batch * gen_length / seconds, 1),
                         "overhead_over_full_forwards": round(seconds / (out.model_calls * forward_s), 3),
                         "full_forward_ms": round(1000 * forward_s, 2),
                         "tokens_processed": out.tokens_processed,
                         "columns_scored": sum(c["rows"] * c["scored"] for c in counting.calls),
                         "minimal_gflop": None if minimal is None else round(minimal, 1)})
        base = next(r for r in rows if r["batch"] == batch and r["sampler"] == "llada")
        for row in rows:  # time ratio over minimal-compute ratio against the llada sampler (1.0: all saved)
            if row["batch"] == batch and row["minimal_gflop"]:
                row["efficiency"] = round((base["seconds"] / row["seconds"]) /
                                          (base["minimal_gflop"] / row["minimal_gflop"]), 3)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"shape": shape, "parameters": parameter_count(policy), "rows": rows, **schedule}


def compiled_sampler(device: torch.device, shape: str, batch: int, schedule: dict, options: dict) -> dict:
    """``torch_compile``'s effect on rollouts: each LLaDA-schedule setting decoded with the plain forward, then with
    the forward compiled in place (``compile_forward``, as ``torch_compile: {}`` does in training), after one
    untimed decode that pays the compilation (its seconds reported); whether the compiled model decoded the same
    tokens (bf16 kernels may round differently)."""
    from dare_gym.core.precision import compile_forward

    policy = random_llada(shape, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    generator = torch.Generator(device=device).manual_seed(0)
    prompt = torch.randint(0, 100_000, (batch, schedule["prompt_length"]), device=device, generator=generator)
    mask = torch.ones_like(prompt)
    settings = {label: SAMPLER_SETTINGS[label] for label in ("llada", "fast_dllm dual cache")}

    def decode(name, extra):
        sampler_options = make_options(name, {"gen_length": schedule["gen_length"], "steps": schedule["steps"],
                                              "block_length": schedule["block_length"], "temperature": 0.0, **extra})
        synchronize(device)
        started = time.perf_counter()
        with torch.no_grad():
            out = get_sampler(name)(policy, prompt, mask, sampler_options)
        synchronize(device)
        return out.completion_ids.cpu(), time.perf_counter() - started

    plain = {label: decode(*setting) for label, setting in settings.items()}
    started = time.perf_counter()
    compile_forward(policy.model, options)
    warm = {label: decode(*setting)[1] for label, setting in settings.items()}  # pays the compilation
    rows = []
    for label, setting in settings.items():
        tokens, seconds = decode(*setting)
        rows.append({"sampler": label, "eager_s": round(plain[label][1], 3), "compiled_s": round(seconds, 3),
                     "speed_up": round(plain[label][1] / seconds, 2), "first_compiled_decode_s": round(warm[label], 1),
                     "same_tokens": bool(torch.equal(tokens, plain[label][0]))})
    return {"shape": shape, "batch": batch, "options": options, "rows": rows,
            "compile_and_first_decodes_s": round(time.perf_counter() - started, 1), **schedule}


def update_memory(device: torch.device, shape: str, schedule: dict) -> dict:
    results = {}
    settings = {
        "LoRA r=8": dict(lora=LoraSettings(r=8, alpha=16), gradient_checkpointing=False, options={}),
        "full fine-tune + gradient checkpointing (beta=0)": dict(lora=None, gradient_checkpointing=True,
                                                                  options={"beta": 0.0}),
    }
    for label, setting in settings.items():
        policy = None
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            policy = random_llada(shape, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
            result = one_update(policy, rows=schedule["rows"], prompt_length=schedule["prompt_length"],
                                gen_length=schedule["gen_length"], group_size=4, micro_batch_size=schedule["rows"],
                                **setting)
            results[label] = {"seconds": round(result["seconds"], 2), "peak_gib": round(result["peak_bytes"] / 2**30, 2),
                              "loss": result["loss"]}
        except torch.cuda.OutOfMemoryError as error:
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            results[label] = {"out_of_memory": str(error).splitlines()[0][:300], "peak_gib_before_oom": peak}
        finally:
            del policy
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"shape": shape, **schedule, "settings": results}


def llada2_sampler(device: torch.device, shape: str, layers: int, batch: int, schedule: dict) -> dict:
    """block_diffusion on a random LLaDA2 model: the exact cache of finished blocks, one token a step (static) and
    the model card's threshold 0.95 (dynamic; a random model is rarely that confident, so it mostly falls back)."""
    policy = random_llada2(shape, layers, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    generator = torch.Generator(device=device).manual_seed(0)
    prompt = torch.randint(0, 100_000, (batch, schedule["prompt_length"]), device=device, generator=generator)
    rows = []
    for label, extra in {"static, 1 token a step": {"remasking_strategy": "low_confidence_static"},
                         "dynamic, threshold 0.95": {"remasking_strategy": "low_confidence_dynamic", "threshold": 0.95}
                         }.items():
        options = make_options("block_diffusion", {"gen_length": schedule["gen_length"], "temperature": 0.0,
                                                   "steps_per_block": schedule["block_length"], "early_exit": False,
                                                   **extra})
        synchronize(device)
        started = time.perf_counter()
        out = get_sampler("block_diffusion")(policy, prompt, torch.ones_like(prompt), options, generator=generator)
        synchronize(device)
        seconds = time.perf_counter() - started
        rows.append({"batch": batch, "rule": label, "seconds": round(seconds, 3), "model_calls": out.model_calls,
                     "tokens_per_s": round(batch * schedule["gen_length"] / seconds, 1),
                     "tokens_processed": out.tokens_processed})
    result = {"shape": shape, "layers": layers, "parameters": parameter_count(policy), "block_size": policy.block_size,
              "rows": rows, **schedule}
    del policy
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def llada2_update(device: torch.device, shape: str, layers: int, schedule: dict) -> dict:
    """One EBPO update (mc_num 2) of a random LLaDA2 model under LoRA r = 8 with gradient checkpointing, and the
    peak the paper count gives for it (weights + adapters and their states + one doubled forward's activations)."""
    from llada2_memory import Shape, activation_bytes, parameter_counts  # noqa: E402

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy = random_llada2(shape, layers, device=device, dtype=dtype)
    config = policy.model.config.to_dict()
    try:
        result = one_update(policy, algorithm="ebpo", rows=schedule["rows"], prompt_length=schedule["prompt_length"],
                            gen_length=schedule["gen_length"], group_size=schedule["rows"],
                            micro_batch_size=schedule["rows"], lora=LoraSettings(r=8, alpha=16),
                            gradient_checkpointing=True, options={"mc_num": 2})
    except torch.cuda.OutOfMemoryError as error:
        return {"out_of_memory": str(error).splitlines()[0][:300]}
    s = Shape.from_config(config)
    counts = parameter_counts(s)
    a = 2 if dtype == torch.bfloat16 else 4
    adapters = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    weights = a * (counts["total"] - counts["parts"]["routers"]) + 4 * counts["parts"]["routers"] + 16 * adapters
    activations = activation_bytes(s, rows=schedule["rows"], prompt=schedule["prompt_length"],
                                   gen=schedule["gen_length"], a=a, checkpointing=True)["peak"]
    out = {"shape": shape, "layers": layers, "parameters": counts["total"], "seconds": round(result["seconds"], 2),
           "loss": result["loss"], "counted_peak_gib": round((weights + activations) / 2**30, 2), **schedule}
    if device.type == "cuda":
        out["peak_gib"] = round(result["peak_bytes"] / 2**30, 2)
    del policy
    return out


def markdown(results: dict) -> str:
    lines = [f"# GPU check on {results['card']}", "", f"torch {results['torch']}, {results['date']}", ""]
    parity, training = results.get("tiny parity", {}), results.get("tiny training", {})
    lines += ["| check | result |", "|---|---|",
              f"| tiny greedy rollouts, device = CPU | {parity.get('identical')}/{parity.get('prompts')} identical "
              f"{parity.get('error', '')} |",
              f"| default recipe, {training.get('steps')} steps on the device | held-out "
              f"{training.get('heldout_accuracy_before')} → {training.get('heldout_accuracy_after')} in "
              f"{training.get('elapsed_s')} s {training.get('error', '')} |", ""]
    for key in [k for k in results if k.startswith("sampler speed")]:
        speed = results[key]
        if "rows" not in speed:
            lines += [f"{key}: {speed.get('error')}", ""]
            continue
        lines += [f"## Samplers, {speed['shape']} shape ({speed['parameters'] / 1e9:.2f}B parameters), prompt "
                  f"{speed['prompt_length']}, gen {speed['gen_length']}, block {speed['block_length']}, "
                  f"{speed['steps']} steps", "",
                  "| batch | sampler | model calls | tokens/s | s | overhead over its full forwards | columns scored "
                  "| efficiency over minimal compute |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['sampler']} | {r['model_calls']} | {r['tokens_per_s']} | {r['seconds']} | "
                  f"{r['overhead_over_full_forwards']} | {r.get('columns_scored')} | {r.get('efficiency', 'n/a')} |"
                  for r in speed["rows"]]
        lines.append("")
    compiled = next((v for k, v in results.items() if k.startswith("compiled sampler")), None)
    if compiled is not None:
        lines += [f"## torch_compile ({compiled.get('shape')} shape, batch {compiled.get('batch')}, options "
                  f"{compiled.get('options')})", ""]
        if "rows" in compiled:
            lines += ["| sampler | eager s | compiled s | speed-up | first compiled decode s | same tokens |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {r['sampler']} | {r['eager_s']} | {r['compiled_s']} | {r['speed_up']}× | "
                      f"{r['first_compiled_decode_s']} | {r['same_tokens']} |" for r in compiled["rows"]]
        else:
            lines.append(f"error: {compiled.get('error')}")
        lines.append("")
    update = next((v for k, v in results.items() if k.startswith("d1 update")), {})
    lines += ["## One d1 update", "", "| setting | seconds | peak GiB |", "|---|---|---|"]
    for label, row in update.get("settings", {}).items():
        if "out_of_memory" in row:
            lines.append(f"| {label} | out of memory | {row['peak_gib_before_oom']} before running out |")
        else:
            lines.append(f"| {label} | {row['seconds']} | {row['peak_gib']} |")
    if "error" in update:
        lines.append(f"error: {update['error']}")
    speed = next((v for k, v in results.items() if k.startswith("llada2 sampler")), None)
    if speed is not None:
        lines += ["", "## LLaDA2 (MoE)", ""]
        if "rows" in speed:
            lines += [f"block_diffusion, {speed['layers']} layers of the {speed['shape']} shape ({speed['parameters'] / 1e9:.2f}B "
                      f"parameters), prompt {speed['prompt_length']}, gen {speed['gen_length']}, blocks of "
                      f"{speed['block_size']}", "", "| batch | rule | model calls | tokens/s | s |", "|---|---|---|---|---|"]
            lines += [f"| {r['batch']} | {r['rule']} | {r['model_calls']} | {r['tokens_per_s']} | {r['seconds']} |"
                      for r in speed["rows"]]
        else:
            lines.append(f"sampler: {speed.get('error')}")
    moe = next((v for k, v in results.items() if k.startswith("llada2 update")), None)
    if moe is not None:
        lines.append("")
        if "seconds" in moe and "loss" in moe:
            lines.append(f"One EBPO update under LoRA (r = 8, checkpointing, {moe['rows']} rows): {moe['seconds']} s, "
                         f"peak {moe.get('peak_gib', 'n/a')} GiB (counted from the config: {moe['counted_peak_gib']} GiB)")
        else:
            lines.append(f"EBPO update: {moe.get('error') or moe.get('out_of_memory')}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and sizes: the CPU test of this script")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "gpu_check")
    parser.add_argument("--skip", nargs="*", default=[], help="parts to skip (e.g. 'sampler speed 8b')")
    parser.add_argument("--llada2-layers", type=int, default=20,
                        help="decoder layers of the LLaDA2.0-mini-wide random model (20: the whole model)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    schedule = dict(prompt_length=64, gen_length=256, block_length=32, steps=256)
    speed_shapes, update_shape, batches, update_rows = ("1.3b", "8b"), "8b", [8, 32], 8
    moe_shape, moe_layers, moe_batch, moe_schedule = "mini", args.llada2_layers, 8, dict(
        prompt_length=64, gen_length=256, block_length=32)
    if args.quick:
        schedule = dict(prompt_length=8, gen_length=16, block_length=8, steps=16)
        speed_shapes, update_shape, batches, update_rows = ("test",), "test", [2], 4
        moe_shape, moe_layers, moe_batch, moe_schedule = "test", 3, 2, dict(prompt_length=8, gen_length=16,
                                                                            block_length=32)
    results = {"card": card_name(device), "device": str(device), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick}
    plan = [("tiny parity", tiny_parity, device, args.quick), ("tiny training", tiny_training, device, args.quick)]
    plan += [(f"sampler speed {shape}", sampler_speed, device, shape, batches, schedule) for shape in speed_shapes]
    # on CPU (--quick) the `eager` backend runs the same capture without needing a C++ toolchain
    compile_options = {"backend": "eager"} if args.quick else {}
    plan.append((f"compiled sampler {speed_shapes[0]}", compiled_sampler, device, speed_shapes[0], batches[0], schedule,
                 compile_options))
    plan.append((f"d1 update {update_shape}", update_memory, device, update_shape, dict(schedule, rows=update_rows)))
    plan.append((f"llada2 sampler {moe_shape}", llada2_sampler, device, moe_shape, moe_layers, moe_batch, moe_schedule))
    plan.append((f"llada2 update {moe_shape}", llada2_update, device, moe_shape, moe_layers,
                 dict(rows=4 if not args.quick else 2, prompt_length=moe_schedule["prompt_length"],
                      gen_length=moe_schedule["gen_length"])))
    for name, function, *arguments in plan:
        if name not in args.skip:
            part(results, name, function, *arguments)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.output / "gpu_check.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
