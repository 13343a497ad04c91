"""Running a comparison's runs: each (algorithm, seed) in a child process of its own.

The parent (:func:`launch`) writes the run's spec to ``spec.json`` and starts ``python -m
dare_gym.tools.compare.run SPEC.json``; the child trains, then writes ``result.json``: its held-out curve, steps,
training seconds and any error. Peak memory is the child's peak resident set size as ``wait4`` reports it
(its ``ru_maxrss``). A run that raises, crashes or times out is recorded with its error.

Timing: a metrics record's ``elapsed_s`` is taken after the step's training and before that step's own
evaluation, and ``time_eval`` is how long that evaluation took; so the training seconds at a record are its
``elapsed_s`` less the ``time_eval`` of the records before it (:func:`learning_curve`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

def _peak_rss_mb(maxrss: float) -> float:
    return maxrss / (1024 * 1024) if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB else


def learning_curve(records: Sequence[dict], rollouts_per_step: int) -> tuple[list[dict], float, float]:
    """A run's held-out curve from its metrics records, with the training seconds at each point (evaluation
    excluded); also the run's total training and evaluation seconds."""
    curve: list[dict] = []
    evaluated = 0.0  # evaluation seconds of the records before the current one
    train_seconds = 0.0
    for record in records:
        train_seconds = max(0.0, record["elapsed_s"] - evaluated)
        if "heldout_accuracy" in record:
            curve.append({
                "step": record["step"], "rollouts": record["step"] * rollouts_per_step,
                "train_seconds": round(train_seconds, 3), "heldout_accuracy": record["heldout_accuracy"],
                "heldout_reward": record.get("heldout_reward"),
            })
        evaluated += record.get("time_eval", 0.0)
    return curve, train_seconds, evaluated


def _train_rl(spec: dict, result: dict) -> None:
    from dare_gym.core.config import dataclass_from_dict
    from dare_gym.train.metrics import METRICS_FILE
    from dare_gym.train.trainer import Trainer, TrainConfig

    config = dataclass_from_dict(TrainConfig, spec["config"])
    metrics = Path(config.output_dir) / METRICS_FILE
    try:
        Trainer(config).train()
    finally:
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
            if metrics.exists() else []
        curve, train_seconds, eval_seconds = learning_curve(records, spec["rollouts_per_step"])
        steps = records[-1]["step"] if records else 0
        result.update(steps=steps, rollouts=steps * spec["rollouts_per_step"], curve=curve,
                      train_seconds=round(train_seconds, 3), eval_seconds=round(eval_seconds, 3))


def _train_sft(spec: dict, result: dict) -> None:
    import torch

    import dare_gym
    from dare_gym.train.console import quiet_library_warnings
    from dare_gym.core.device import make_generator, resolve_device, resolve_dtype
    from dare_gym.train.evaluation import evaluate
    from dare_gym.core.sft import train_on_demonstrations
    from dare_gym.train.trainer import GenerationConfig, seed_everything
    from dare_gym.train.user_code import resolve_env_kwargs

    config = spec["config"]
    if config.get("torch_threads"):  # as the trainer does, so that SFT gets the same cores as the RL runs
        torch.set_num_threads(config["torch_threads"])
    seed_everything(config["seed"])
    device = resolve_device(config.get("device", "auto"))
    with quiet_library_warnings():
        policy = dare_gym.load_policy(config["policy"], device=device, dtype=resolve_dtype(config.get("dtype"), device),
                                      family=config.get("policy_family"))
    train_env = dare_gym.make(config["env"], **resolve_env_kwargs(config.get("env_kwargs", {})))
    eval_env = dare_gym.make(config["env"], **resolve_env_kwargs(config.get("eval_env_kwargs", {})))
    generation = GenerationConfig(**config.get("evaluation", {})).as_kwargs()
    answer_length = (config.get("rollout") or {}).get("gen_length") or policy.generation_defaults["gen_length"]
    seconds, interval = spec["seconds"], spec["eval_interval_s"]

    def score(step: int, elapsed: float) -> None:
        scores = evaluate(policy, eval_env, limit=config["eval_size"], batch_size=config.get("rollout_batch_size", 256),
                          **generation)
        curve.append({"step": step, "train_seconds": round(elapsed, 3), "heldout_accuracy": scores.accuracy,
                      "heldout_reward": scores.mean_reward})

    curve: list[dict] = []
    score(0, 0.0)
    state = {"next": interval, "step": 0, "elapsed": 0.0}

    def on_step(step: int, elapsed: float, loss: float) -> None:
        state.update(step=step, elapsed=elapsed)
        if elapsed >= state["next"] and elapsed < seconds:
            score(step, elapsed)
            state["next"] += interval

    steps = train_on_demonstrations(
        policy, train_env, answer_length=answer_length, learning_rate=config["learning_rate"],
        batch_size=spec["batch_size"], seconds=seconds, generator=make_generator(device, config["seed"]),
        callback=on_step, progress=False,
    )
    if curve[-1]["step"] != steps:
        score(steps, state["elapsed"])
    result.update(steps=steps, rollouts=None, demonstrations=steps * spec["batch_size"], curve=curve,
                  train_seconds=round(state["elapsed"], 3), seconds_budget=seconds)


def run_single(spec_path: str | Path) -> int:
    """The child process: run the spec's training, write its result JSON (with any error); 0 if it ran."""
    import resource

    started = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    result: dict[str, Any] = {"algorithm": spec["algorithm"], "seed": spec["seed"], "error": None}
    try:
        from dare_gym.train.user_code import import_module

        for module in dict.fromkeys([*spec.get("imports", []), *spec["config"].get("imports", [])]):
            import_module(module, where=f"--import {module}")
        (_train_sft if spec["kind"] == "sft" else _train_rl)(spec, result)
    except Exception as error:  # recorded, not raised: the parent goes on with the other runs
        result["error"] = f"{type(error).__name__}: {error}".strip()
        result["traceback"] = traceback.format_exc()
        print(result["traceback"], file=sys.stderr, flush=True)
    result["child_seconds"] = round(time.perf_counter() - started, 3)
    result["child_peak_memory_mb"] = round(_peak_rss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), 1)
    path = Path(spec["result_path"])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)
    return 0 if result["error"] is None else 1


def launch(spec: dict, run_dir: Path, timeout: float | None) -> dict:
    """Run ``spec`` in a child process; returns its result dict with wall time and peak memory filled in."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path, log_path = run_dir / "spec.json", run_dir / "result.json", run_dir / "log.txt"
    spec = dict(spec, result_path=str(result_path.resolve()))
    spec_path.write_text(json.dumps(spec, indent=1) + "\n")
    result_path.unlink(missing_ok=True)
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    timed_out = False
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "dare_gym.tools.compare.run", str(spec_path.resolve())],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
        usage = None
        try:
            if hasattr(os, "wait4"):
                while True:
                    pid, status, usage = os.wait4(process.pid, os.WNOHANG if timeout else 0)
                    if pid:
                        process.returncode = os.waitstatus_to_exitcode(status)
                        break
                    if time.perf_counter() - started > timeout:
                        timed_out = True
                        process.kill()
                        _, status, usage = os.wait4(process.pid, 0)
                        process.returncode = os.waitstatus_to_exitcode(status)
                        break
                    time.sleep(0.1)
            else:  # pragma: no cover - no wait4: the child's own report of its peak memory is used
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    process.kill()
                    process.wait()
        except BaseException:  # Ctrl-C: do not leave the child behind
            process.kill()
            process.wait()
            raise
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {}
    if result_path.exists():
        result = json.loads(result_path.read_text())
    if timed_out:
        result["error"] = f"timed out after {timeout:g} s (--run-timeout)"
    elif not result:
        result["error"] = f"the run's process exited with code {process.returncode} and no result (see {log_path})"
    elif process.returncode and not result.get("error"):
        result["error"] = f"the run's process exited with code {process.returncode}"
    result.setdefault("error", None)
    result.update(algorithm=spec["algorithm"], seed=spec["seed"], total_seconds=round(seconds, 2),
                  log=str(log_path), run_dir=str(run_dir), exit_code=process.returncode)
    if usage is not None:
        result["peak_memory_mb"] = round(_peak_rss_mb(usage.ru_maxrss), 1)
    else:
        result["peak_memory_mb"] = result.get("child_peak_memory_mb")
    (run_dir / RUN_RECORD).write_text(json.dumps(result, indent=1) + "\n")  # what --resume keeps
    return result


RUN_RECORD = "run.json"  # a finished run as the parent saw it (the child's result, wall time, peak memory)


def finished_runs(output: Path) -> dict[tuple[str, int], dict]:
    """The runs an earlier comparison in ``output`` finished without error, by (algorithm, seed): each run folder's
    ``run.json``, or, for a comparison written before those existed, its ``compare.json``."""
    found: dict[tuple[str, int], dict] = {}
    report = output / "compare.json"
    if report.exists():
        for run in json.loads(report.read_text()).get("runs", []):
            found[(run["algorithm"], run["seed"])] = run
    for record in sorted(output.glob(f"runs/*/{RUN_RECORD}")):
        run = json.loads(record.read_text())
        found[(run["algorithm"], run["seed"])] = run
    return {key: run for key, run in found.items() if run.get("error") is None}


def reusable(earlier: dict[tuple[str, int], dict], spec: dict, run_dir: Path) -> dict | None:
    """The earlier result of this run if it ran exactly this spec: the same ``spec.json`` and, for an RL run, the
    same resolved algorithm section in its ``config.json`` (every field, so a changed algorithm default reruns it
    too); else None."""
    from dare_gym.core.config import dataclass_from_dict
    from dare_gym.train.trainer import TrainConfig

    run = earlier.get((spec["algorithm"], spec["seed"]))
    spec_path = run_dir / "spec.json"
    if run is None or not spec_path.exists():
        return None
    saved = {k: v for k, v in json.loads(spec_path.read_text()).items() if k != "result_path"}
    if saved != json.loads(json.dumps(spec)):
        return None
    if spec["kind"] == "rl":
        recorded = Path(spec["config"]["output_dir"]) / "config.json"
        try:
            expected = dataclass_from_dict(TrainConfig, spec["config"]).resolved()
        except Exception:  # noqa: BLE001 - an algorithm that no longer accepts these settings reruns (and says why)
            return None
        if not recorded.exists() or \
                json.loads(recorded.read_text()).get("algorithm") != json.loads(json.dumps(expected["algorithm"])):
            return None
    return dict(run)


def complete(result: dict, threshold: float) -> dict:
    """Fill in the derived columns (final and initial accuracy, first step at ≥ threshold, s/step)."""
    curve = result.get("curve") or []
    steps = result.get("steps") or 0
    result.setdefault("steps", steps)
    result.setdefault("rollouts", None)
    ok = result.get("error") is None
    result["initial_heldout_accuracy"] = curve[0]["heldout_accuracy"] if curve and curve[0]["step"] == 0 else None
    result["final_heldout_accuracy"] = curve[-1]["heldout_accuracy"] if ok and curve else None
    first = next((point for point in curve if point["heldout_accuracy"] >= threshold), None)
    result["step_to_threshold"] = first["step"] if first else None
    result["rollouts_to_threshold"] = first.get("rollouts") if first else None
    result["seconds_to_threshold"] = first["train_seconds"] if first else None
    train = result.get("train_seconds")
    result["seconds_per_step"] = round(train / steps, 4) if train is not None and steps else None
    return result


def run_name(algorithm: str, seed: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', algorithm)}-seed{seed}"


def describe(result: dict) -> str:
    if result["error"]:
        error = result["error"].splitlines()[0][:200]
        return f"FAILED after {result.get('steps') or 0} steps: {error} (log: {result.get('log', 'none: not started')})"
    unit = f"{result['rollouts']} rollouts" if result.get("rollouts") is not None else "SFT"
    before, after = result["initial_heldout_accuracy"], result["final_heldout_accuracy"]
    accuracy = "n/a" if after is None else (f"{before:.3f} -> {after:.3f}" if before is not None else f"{after:.3f}")
    return (f"held-out {accuracy}, {result['steps']} steps ({unit}), {result['seconds_per_step'] or 0:.3f} s/step, "
            f"{result['total_seconds']:.0f} s total, peak {result['peak_memory_mb'] or 0:.0f} MB")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m dare_gym.tools.compare.run SPEC.json (started by dare-gym compare)")
    sys.exit(run_single(sys.argv[1]))
