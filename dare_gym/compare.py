"""``dare-gym compare``: fair algorithm comparisons in one command.

Every run trains the same policy on the same env and is scored on the same held-out records, and every
run consumes the same number of rollouts (completions sampled and rewarded):

    max_steps = budget_rollouts // (prompts_per_step × group_size),   time_limit_minutes = null

The comparison that ships with the package (digitsort-v0, the tiny policy, 16 prompts × 8 completions per
step, each algorithm at its own defaults; 50 steps = 6,400 rollouts per run):

    dare-gym compare --config experiments/configs/compare_default.yaml --algorithms all --seeds 0 1 2 \\
        --budget-rollouts 6400 --sft-baseline --output runs/compare

(minutes per run on 2 CPU cores, more for algorithms that update many times per batch: d1 at its paper
defaults makes 12; the runs are sequential, so the whole comparison takes hours.)

A quicker look: ``dare-gym compare --algorithms d1 --seeds 0 --budget-rollouts 1280`` (the packaged
default.yaml's recipe, 5 steps of 32 × 8).

Algorithm options. Each algorithm starts from its own config's defaults. The YAML's ``algorithm:`` section
is the shared recipe: ``name`` is replaced by the algorithm being run, and only the options that are fields
of that algorithm's config class are kept (the others are dropped and listed in the report). When an
algorithm's config rejects the values it keeps (e.g. an estimator or a KL weight the algorithm cannot use),
that algorithm runs at its own defaults instead, with a note; with ``--no-shared-recipe`` the section
applies only to the algorithm it names. ``algorithm.<field>=value``
overrides then apply to every algorithm whose config has that field, and are ignored, with a note, for the
others (an override that matches no compared algorithm is an error: probably a typo). Other dotted overrides
(``eval_size=100``) set shared fields; ``max_steps``, ``time_limit_minutes``, ``seed``, ``output_dir`` and
``algorithm.name`` are set by the comparison itself. Checkpoints are written only at the end of each run.

Isolation. Each (algorithm, seed) run is a separate process (``python -m dare_gym.compare --single
SPEC.json``), run one after the other, seed by seed (all algorithms for seed 0, then seed 1, ...), so that
drift in machine speed spreads over algorithms. Peak memory is the child's peak resident set size as
``wait4`` reports it (its ``ru_maxrss``). A run that raises, crashes or times out is recorded with its
error and the comparison goes on.

Timing. ``train_seconds`` is the trainer's wall time minus the time spent in held-out evaluation (the same
work for every algorithm, and not part of learning); ``seconds_per_step = train_seconds / steps``;
``total_seconds`` is the child process's whole wall time (start-up, model loading, evaluation, checkpoint).

SFT baseline (``--sft-baseline``). For each seed, continued masked-diffusion SFT on gold demonstrations of
the training split (``dare_gym.sft.train_on_demonstrations``) from the same starting policy, with the
shared learning rate, for a wall time equal to the mean ``train_seconds`` of that seed's successful RL
runs (evaluation excluded on both sides: the SFT callback's time is not counted either). The choice of the
mean matches the baseline to a typical RL run's compute; per-algorithm times are in results.csv. It is
evaluated on the same held-out records as often as the RL runs are (the same number of evaluations, evenly
spaced in time), with the same evaluation sampler settings and ``torch_threads``. Batches are
``--sft-batch-size`` demonstrations (64); SFT stops after the first step that reaches the time, so it may
overshoot by one step (``train_seconds`` in its row is what it used). SFT sees the answers, so it is an
upper reference, not a competitor.

Out-of-tree algorithms: ``--import MODULE`` imports a module that registers algorithms, in the parent and in
every run. The command exits 0 when at least one run succeeded, 1 when none did, 2 on a config error.

Outputs (in ``--output``, default runs/compare):

* ``results.csv``: one row per run (the SFT rows are named ``sft-baseline``), see :data:`CSV_COLUMNS`;
* ``summary.md``: a Markdown table, one row per algorithm (mean ± population std over seeds), plus notes;
* ``curves.png``: held-out accuracy against rollouts consumed (mean line, ± std band, thin per-seed lines),
  and against training seconds on a second panel, where the SFT baseline is drawn;
* ``compare.json``: settings, per-algorithm options, notes, every run with its curve, and the summary;
* ``runs/<algorithm>-seed<k>/``: each run's spec, log, result and trainer output (metrics.jsonl...).

Python API: :func:`run_comparison` (everything above), :func:`plan_comparison` (the run configs without
running them), :func:`filter_algorithm_options`, :func:`summarize`, :func:`markdown_table`,
:func:`plot_curves`.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from dare_gym.config import ConfigError, load_config_dict, parse_overrides

SFT_NAME = "sft-baseline"
ALL = "all"
RESERVED = {
    "max_steps": "--budget-rollouts",
    "time_limit_minutes": "--budget-rollouts (budgets are in rollouts, not time)",
    "seed": "--seeds",
    "output_dir": "--output",
    "algorithm.name": "--algorithms",
    "algorithm": "algorithm.<field>=value",
}
CSV_COLUMNS = [
    "algorithm", "seed", "final_heldout_accuracy", "initial_heldout_accuracy", "step_to_threshold",
    "rollouts_to_threshold", "seconds_to_threshold", "steps", "rollouts", "seconds_per_step", "train_seconds",
    "total_seconds", "peak_memory_mb", "error",
]


# ----------------------------------------------------------------------------------------- planning


def config_fields(name: str) -> list[str]:
    """The init fields of algorithm ``name``'s config dataclass."""
    from dare_gym.algorithms import get_algorithm

    cls = get_algorithm(name).config_class
    return [f.name for f in dataclasses.fields(cls) if f.init]


def filter_algorithm_options(name: str, options: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Split a recipe's algorithm ``options`` into those algorithm ``name``'s config has (kept) and the rest
    (dropped, sorted). ``name`` in ``options`` is neither kept nor dropped."""
    fields = set(config_fields(name))
    kept = {k: v for k, v in options.items() if k != "name" and k in fields}
    dropped = sorted(k for k in options if k != "name" and k not in fields)
    return kept, dropped


def resolve_algorithms(names: Sequence[str]) -> list[str]:
    """Expand ``all``, drop duplicates (keeping order) and reject unknown names with the registered ones."""
    from dare_gym.algorithms import list_algorithms

    registered = list_algorithms()
    resolved: list[str] = []
    for name in names:
        for item in registered if name == ALL else [name]:
            if item not in registered:
                raise ConfigError(f"unknown algorithm {item!r}; registered: {', '.join(registered)} (or 'all')")
            if item not in resolved:
                resolved.append(item)
    if not resolved:
        raise ConfigError("no algorithms to compare")
    return resolved


def _split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[tuple[str, str, Any]]]:
    """Shared overrides (kept as strings) and ``algorithm.<field>`` ones as (text, field path, value)."""
    shared, algorithm = [], []
    for text, (key, value) in zip(overrides, parse_overrides(overrides)):
        if key in RESERVED:
            raise ConfigError(f"override {text!r}: {key} is set by the comparison; use {RESERVED[key]}")
        if key.startswith("algorithm."):
            algorithm.append((text, key[len("algorithm."):], value))
        else:
            shared.append(text)
    return shared, algorithm


def _set_path(data: dict, dotted: str, value: Any) -> None:
    from dare_gym.config import set_dotted

    set_dotted(data, dotted, value)


@dataclasses.dataclass
class ComparisonPlan:
    """What :func:`run_comparison` will run: one config dict (for ``TrainConfig``) per (algorithm, seed)."""

    algorithms: list[str]
    seeds: list[int]
    budget_rollouts: int
    rollouts_per_step: int
    max_steps: int
    shared: dict[str, Any]  # the shared TrainConfig fields, without algorithm/seed/output_dir/max_steps
    options: dict[str, dict[str, Any]]  # algorithm -> its algorithm section (with name)
    dropped: dict[str, list[str]]  # algorithm -> recipe options its config lacks
    ignored_overrides: dict[str, list[str]]  # algorithm -> overrides naming fields its config lacks
    config_errors: dict[str, str]  # algorithm -> why its config is invalid (its runs are recorded as failed)
    notes: list[str]
    resolved: dict[str, Any]  # every shared TrainConfig field with its value (defaults filled in)

    def run_config(self, algorithm: str, seed: int, output_dir: str | Path) -> dict[str, Any]:
        return {
            **json.loads(json.dumps(self.shared)), "algorithm": dict(self.options[algorithm]), "seed": seed,
            "max_steps": self.max_steps, "time_limit_minutes": None, "output_dir": str(output_dir),
            "progress": False, "save_every": self.max_steps + 1, "keep_checkpoints": 1,
        }


def plan_comparison(
    algorithms: Sequence[str],
    seeds: Sequence[int],
    budget_rollouts: int,
    *,
    config_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    shared_recipe: bool = True,
) -> ComparisonPlan:
    """Resolve names, budgets and per-algorithm options; shared config errors raise :class:`ConfigError`."""
    from dare_gym.config import dataclass_from_dict
    from dare_gym.trainer import TrainConfig

    if config_path is None:
        from dare_gym.cli import default_config_path

        config_path = default_config_path()
    names = resolve_algorithms(algorithms)
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    shared_overrides, algorithm_overrides = _split_overrides(overrides)
    data = load_config_dict(config_path, shared_overrides)
    for key in ("max_steps", "time_limit_minutes", "seed", "output_dir"):
        data.pop(key, None)
    recipe = data.pop("algorithm", None) or {}
    if not isinstance(recipe, dict):
        raise ConfigError(f"{config_path}: algorithm must be a mapping, got {recipe!r}")
    recipe_name = recipe.get("name", "d1")
    per_algorithm = data.pop("algorithm_options", None) or {}  # {algorithm: {field: value}}, after the recipe
    if not isinstance(per_algorithm, dict):
        raise ConfigError(f"{config_path}: algorithm_options must map algorithm names to options, got {per_algorithm!r}")
    for name, extra in per_algorithm.items():
        resolve_algorithms([name])  # an unknown algorithm name is an error here
        unknown = sorted(set(extra) - set(config_fields(name)))
        if unknown:
            raise ConfigError(f"{config_path}: algorithm_options.{name}: {', '.join(unknown)} are not fields of "
                              f"{_config_class_name(name)}; valid: {', '.join(sorted(config_fields(name)))}")
    # shared fields are validated once, with the first algorithm at its own defaults
    probe = dataclass_from_dict(TrainConfig, {**data, "algorithm": {"name": names[0]}})
    rollouts_per_step = probe.prompts_per_step * probe.group_size
    if budget_rollouts < rollouts_per_step:
        raise ConfigError(
            f"--budget-rollouts {budget_rollouts} is less than one step's {rollouts_per_step} rollouts "
            f"({probe.prompts_per_step} prompts × {probe.group_size} completions)"
        )
    max_steps = budget_rollouts // rollouts_per_step
    notes = [
        f"budget: {budget_rollouts} rollouts = {max_steps} steps × {rollouts_per_step} "
        f"({probe.prompts_per_step} prompts × {probe.group_size} completions); time_limit_minutes=null",
        "checkpoints: one at the end of each run (save_every is set past max_steps)",
    ]
    if max_steps * rollouts_per_step != budget_rollouts:
        notes.append(f"{budget_rollouts - max_steps * rollouts_per_step} rollouts of the budget are left unused "
                     f"(not a whole step)")
    options, dropped, ignored, errors = {}, {}, {}, {}
    used_overrides: set[str] = set()
    for name in names:
        own = recipe if shared_recipe or name == recipe_name else {}
        kept, dropped[name] = filter_algorithm_options(name, {k: v for k, v in own.items() if k != "name"})
        if name == recipe_name and dropped[name]:  # the recipe's own algorithm: an unknown option is a typo
            raise ConfigError(f"{config_path}: algorithm option(s) {', '.join(dropped[name])} are not fields of "
                              f"{_config_class_name(name)} ({name}); valid: {', '.join(sorted(config_fields(name)))}")
        fields = set(config_fields(name))
        ignored[name] = []

        def section_with(recipe_options: dict) -> dict:
            section = {"name": name, **json.loads(json.dumps(recipe_options))}
            for text, path, value in algorithm_overrides:
                if path.split(".")[0] in fields:
                    _set_path(section, path, value)
                    used_overrides.add(text)
                elif text not in ignored[name]:
                    ignored[name].append(text)
            return section

        def invalid(section: dict) -> str | None:
            try:
                dataclass_from_dict(TrainConfig, {**data, "algorithm": section})
            except (ConfigError, ValueError, TypeError) as error:
                return str(error)
            return None

        own_options = per_algorithm.get(name, {})
        section = section_with({**kept, **own_options})
        if dropped[name]:
            notes.append(f"{name}: dropped recipe option(s) {', '.join(dropped[name])} "
                         f"(not fields of {_config_class_name(name)})")
        if ignored[name]:
            notes.append(f"{name}: ignored override(s) {', '.join(ignored[name])} "
                         f"(no such field in {_config_class_name(name)})")
        error = invalid(section)
        if error and kept and name != recipe_name:
            # the shared recipe has fields this algorithm has but values it rejects (an estimator it cannot
            # use, a KL term it does not have): run it at its own defaults, plus the overrides, and say so
            fallback = section_with(dict(own_options))
            if invalid(fallback) is None:
                notes.append(f"{name}: rejects the shared recipe ({error}); runs at its own defaults instead "
                             f"(recipe options not applied: {', '.join(sorted(kept))})")
                dropped[name] = sorted(set(dropped[name]) | set(kept))
                section, error = fallback, None
        if error:
            errors[name] = f"ConfigError: {error}"
            notes.append(f"{name}: invalid config, its runs are recorded as failed: {error}")
        options[name] = section
    if not shared_recipe:
        notes.append(f"--no-shared-recipe: the config's algorithm options apply to {recipe_name} only")
    unused = [text for text, _, _ in algorithm_overrides if text not in used_overrides]
    if unused:
        raise ConfigError(f"override(s) {', '.join(unused)} match no field of any compared algorithm "
                          f"({', '.join(names)})")
    resolved = json.loads(json.dumps(dataclasses.asdict(probe)))
    for key in ("algorithm", "seed", "output_dir", "max_steps", "time_limit_minutes", "progress"):
        resolved.pop(key, None)
    return ComparisonPlan(names, seeds, budget_rollouts, rollouts_per_step, max_steps, data, options, dropped,
                          ignored, errors, notes, resolved)


def _config_class_name(name: str) -> str:
    from dare_gym.algorithms import get_algorithm

    return get_algorithm(name).config_class.__name__


# ---------------------------------------------------------------------------------- one run (child)


def _peak_rss_mb(maxrss: float) -> float:
    return maxrss / (1024 * 1024) if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB else


def _train_rl(spec: dict, result: dict) -> None:
    from dare_gym.config import dataclass_from_dict
    from dare_gym.trainer import METRICS_FILE, Trainer, TrainConfig

    class TimedTrainer(Trainer):
        """Records how long each held-out evaluation takes, so that it can be taken out of the run's time."""

        eval_durations: list[float] = []

        def evaluate(self):
            started = time.perf_counter()
            scores = super().evaluate()
            self.eval_durations.append(time.perf_counter() - started)
            return scores

    TimedTrainer.eval_durations = durations = []
    config = dataclass_from_dict(TrainConfig, spec["config"])
    metrics = Path(config.output_dir) / METRICS_FILE
    try:
        TimedTrainer(config).train()
    finally:
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
            if metrics.exists() else []
        curve, evals = [], 0
        for record in records:
            if "heldout_accuracy" in record:
                evals += 1
                spent = sum(durations[:evals])
                curve.append({
                    "step": record["step"], "rollouts": record["step"] * spec["rollouts_per_step"],
                    "train_seconds": 0.0 if record["step"] == 0 else round(max(0.0, record["elapsed_s"] - spent), 3),
                    "heldout_accuracy": record["heldout_accuracy"], "heldout_reward": record.get("heldout_reward"),
                })
        steps = records[-1]["step"] if records else 0
        last_elapsed = records[-1]["elapsed_s"] if records else 0.0
        result.update(
            steps=steps, rollouts=steps * spec["rollouts_per_step"], curve=curve,
            train_seconds=round(max(0.0, last_elapsed - sum(durations[:evals])), 3),
            eval_seconds=round(sum(durations), 3),
        )


def _train_sft(spec: dict, result: dict) -> None:
    import torch

    import dare_gym
    from dare_gym.evaluation import evaluate
    from dare_gym.sft import train_on_demonstrations
    from dare_gym.trainer import GenerationConfig, seed_everything

    config = spec["config"]
    if config.get("torch_threads"):  # as the trainer does, so that SFT gets the same cores as the RL runs
        torch.set_num_threads(config["torch_threads"])
    seed_everything(config["seed"])
    policy = dare_gym.load_policy(config["policy"])
    train_env = dare_gym.make(config["env"], **config.get("env_kwargs", {}))
    eval_env = dare_gym.make(config["env"], **config.get("eval_env_kwargs", {}))
    generation = GenerationConfig(**config.get("evaluation", {})).as_kwargs()
    answer_length = (config.get("rollout") or {}).get("gen_length") or policy.generation_defaults["gen_length"]
    seconds, interval = spec["seconds"], spec["eval_interval_s"]

    def score(step: int, elapsed: float) -> None:
        scores = evaluate(policy, eval_env, limit=config["eval_size"], batch_size=config.get("micro_batch_size", 256),
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
        batch_size=spec["batch_size"], seconds=seconds, generator=torch.Generator().manual_seed(config["seed"]),
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
        for module in spec.get("imports", []):
            importlib.import_module(module)
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


# --------------------------------------------------------------------------------- one run (parent)


def _launch(spec: dict, run_dir: Path, timeout: float | None) -> dict:
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
        process = subprocess.Popen([sys.executable, "-m", "dare_gym.compare", "--single", str(spec_path.resolve())],
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
    return result


def _complete(result: dict, threshold: float) -> dict:
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


def _run_name(algorithm: str, seed: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', algorithm)}-seed{seed}"


def _describe(result: dict) -> str:
    if result["error"]:
        error = result["error"].splitlines()[0][:200]
        return f"FAILED after {result.get('steps') or 0} steps: {error} (log: {result.get('log', 'none: not started')})"
    unit = f"{result['rollouts']} rollouts" if result.get("rollouts") is not None else "SFT"
    before, after = result["initial_heldout_accuracy"], result["final_heldout_accuracy"]
    accuracy = "n/a" if after is None else (f"{before:.3f} -> {after:.3f}" if before is not None else f"{after:.3f}")
    return (f"held-out {accuracy}, {result['steps']} steps ({unit}), {result['seconds_per_step'] or 0:.3f} s/step, "
            f"{result['total_seconds']:.0f} s total, peak {result['peak_memory_mb'] or 0:.0f} MB")


# ------------------------------------------------------------------------------------------ summary


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: Sequence[dict], threshold: float) -> list[dict]:
    """One row per algorithm (in run order; the SFT baseline last): aggregates over its successful runs."""
    names = list(dict.fromkeys(r["algorithm"] for r in runs if r["algorithm"] != SFT_NAME))
    if any(r["algorithm"] == SFT_NAME for r in runs):
        names.append(SFT_NAME)
    rows = []
    for name in names:
        group = [r for r in runs if r["algorithm"] == name]
        ok = [r for r in group if r["error"] is None]
        finals = [r["final_heldout_accuracy"] for r in ok if r["final_heldout_accuracy"] is not None]
        initials = [r["initial_heldout_accuracy"] for r in ok if r["initial_heldout_accuracy"] is not None]
        reached = [r for r in ok if r["step_to_threshold"] is not None]
        per_step = [r["seconds_per_step"] for r in ok if r["seconds_per_step"] is not None]
        memory = [r["peak_memory_mb"] for r in group if r.get("peak_memory_mb")]
        mean, std = _mean_std(finals) if finals else (None, None)
        rows.append({
            "algorithm": name, "runs": len(group), "runs_ok": len(ok),
            "initial_heldout_accuracy": statistics.fmean(initials) if initials else None,
            "final_heldout_accuracy_mean": mean, "final_heldout_accuracy_std": std,
            "final_heldout_accuracy": finals,
            "median_step_to_threshold": _median([r["step_to_threshold"] for r in reached]),
            "median_seconds_to_threshold": _median([r["seconds_to_threshold"] for r in reached]),
            "seeds_reached_threshold": len(reached),
            "seconds_per_step": statistics.fmean(per_step) if per_step else None,
            "peak_memory_mb": max(memory) if memory else None,
            "errors": [f"seed {r['seed']}: {r['error'].splitlines()[0]}" for r in group if r["error"]],
        })
    return rows


def markdown_table(rows: Sequence[dict], threshold: float) -> str:
    """The summary rows as a Markdown table."""
    def fmt(value, spec=".3f", empty="—"):
        return empty if value is None else format(value, spec)

    lines = [
        f"| algorithm | runs ok | held-out acc. before | final held-out acc. (mean ± std) | "
        f"median step to ≥ {threshold:g} (seeds reached) | median train s to ≥ {threshold:g} | s / step | "
        f"peak memory MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        label = "continued SFT on gold (same wall time)" if row["algorithm"] == SFT_NAME else row["algorithm"]
        final = "failed" if row["final_heldout_accuracy_mean"] is None else \
            f"{row['final_heldout_accuracy_mean']:.3f} ± {row['final_heldout_accuracy_std']:.3f}"
        step = fmt(row["median_step_to_threshold"], "g")
        lines.append(
            f"| {label} | {row['runs_ok']}/{row['runs']} | {fmt(row['initial_heldout_accuracy'])} | {final} | "
            f"{step} ({row['seeds_reached_threshold']}/{row['runs_ok']}) | "
            f"{fmt(row['median_seconds_to_threshold'], '.1f')} | "
            f"{fmt(row['seconds_per_step'])} | {fmt(row['peak_memory_mb'], '.0f')} |"
        )
    return "\n".join(lines)


def write_csv(runs: Sequence[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for run in runs:
            row = {}
            for column in CSV_COLUMNS:
                value = run.get(column)
                row[column] = "" if value is None else (value.splitlines()[0] if column == "error" else value)
            writer.writerow(row)


def _band(runs: Sequence[dict], x_key: str):
    """Mean and std of the runs' held-out accuracy, interpolated on a common grid up to the shortest run."""
    import numpy as np

    curves = [[(p[x_key], p["heldout_accuracy"]) for p in r["curve"] if p.get(x_key) is not None] for r in runs]
    curves = [c for c in curves if len(c) >= 1]
    if not curves:
        return None
    horizon = min(c[-1][0] for c in curves)
    xs = sorted({x for c in curves for x, _ in c if x <= horizon}) or [0.0]
    grid = np.unique(np.concatenate([np.linspace(0, horizon, 50), xs])) if horizon > 0 else np.array(xs, float)
    values = np.array([np.interp(grid, [x for x, _ in c], [y for _, y in c]) for c in curves])
    return grid, values.mean(0), values.std(0), curves


def plot_curves(runs: Sequence[dict], path: Path, title: str = "") -> Path:
    """Held-out accuracy vs rollouts (left) and vs training seconds with the SFT baseline (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    names = list(dict.fromkeys(r["algorithm"] for r in runs if r["algorithm"] != SFT_NAME))
    # Many algorithms: 20 colours, and a second line style once they repeat, so that no two lines look alike.
    colors, styles = plt.get_cmap("tab20"), ("-", "--", ":", "-.")
    many = len(names) > 6  # per-seed lines would bury the means
    for index, name in enumerate(names):
        ok = [r for r in runs if r["algorithm"] == name and r["error"] is None and r.get("curve")]
        color, style = colors(index % 20), styles[(index // 20) % len(styles)]
        for axis, key in ((left, "rollouts"), (right, "train_seconds")):
            band = _band(ok, key)
            if band is None:
                continue
            grid, mean, std, curves = band
            axis.plot(grid, mean, color=color, ls=style, lw=1.8, label=f"{name} (mean of {len(ok)})")
            axis.fill_between(grid, mean - std, mean + std, color=color, alpha=0.08 if many else 0.18, linewidth=0)
            for curve in [] if many else curves:
                axis.plot(*zip(*curve), color=color, alpha=0.35, lw=0.7)
    sft = [r for r in runs if r["algorithm"] == SFT_NAME and r["error"] is None and r.get("curve")]
    band = _band(sft, "train_seconds")
    if band is not None:
        grid, mean, std, curves = band
        right.plot(grid, mean, color="black", ls="--", label=f"continued SFT on gold (mean of {len(sft)})")
        right.fill_between(grid, mean - std, mean + std, color="black", alpha=0.12, linewidth=0)
        for curve in curves:
            right.plot(*zip(*curve), color="black", alpha=0.3, lw=0.7, ls="--")
        right.set_title("vs training wall time (evaluation excluded)")
    else:
        right.set_title("vs training wall time (no SFT baseline: --sft-baseline)")
    left.set_title("vs rollouts consumed (equal budgets)")
    left.set_xlabel("rollouts (completions sampled)")
    right.set_xlabel("training seconds")
    for axis in (left, right):
        axis.set_ylabel("held-out greedy accuracy")
        axis.grid(alpha=0.3)
    handles, labels = right.get_legend_handles_labels()
    if handles:  # one legend for both panels, outside them
        figure.legend(handles, labels, loc="center left", bbox_to_anchor=(0.80, 0.5), fontsize=8, frameon=False)
    if title:
        figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 0.80 if handles else 1, 1))
    from dare_gym.trainer import save_figure

    return save_figure(figure, path)


# ------------------------------------------------------------------------------------------- driver


def run_comparison(
    algorithms: Sequence[str],
    seeds: Sequence[int] = (0, 1, 2),
    budget_rollouts: int = 6400,
    *,
    config_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    output_dir: str | Path = "runs/compare",
    threshold: float = 0.8,
    sft_baseline: bool = False,
    sft_batch_size: int = 64,
    imports: Sequence[str] = (),
    shared_recipe: bool = True,
    run_timeout: float | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every (algorithm, seed) in its own process, then write results.csv, summary.md, curves.png and
    compare.json to ``output_dir``; returns compare.json's content (its ``table`` is the Markdown table)."""
    for module in imports:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(f"--import {module}: {error}") from None
    plan = plan_comparison(algorithms, seeds, budget_rollouts, config_path=config_path, overrides=overrides,
                           shared_recipe=shared_recipe)
    if sft_baseline and plan.resolved["eval_size"] == 0:
        raise ConfigError("--sft-baseline needs held-out evaluation: eval_size must be > 0")
    output = Path(output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    for note in plan.notes:
        echo(f"note: {note}")
    total = len(plan.algorithms) * len(plan.seeds) + (len(plan.seeds) if sft_baseline else 0)
    runs: list[dict] = []
    started = time.perf_counter()
    count = 0
    for seed in plan.seeds:
        seed_runs = []
        for name in plan.algorithms:
            count += 1
            run_dir = output / "runs" / _run_name(name, seed)
            if name in plan.config_errors:
                result = {"algorithm": name, "seed": seed, "error": plan.config_errors[name], "steps": 0,
                          "rollouts": 0, "curve": [], "total_seconds": 0.0, "peak_memory_mb": None}
            else:
                config = plan.run_config(name, seed, run_dir / "train")
                spec = {"kind": "rl", "algorithm": name, "seed": seed, "config": config, "imports": list(imports),
                        "rollouts_per_step": plan.rollouts_per_step}
                result = _launch(spec, run_dir, run_timeout)
                if result.get("rollouts") is None:  # killed before it could report
                    result["rollouts"] = (result.get("steps") or 0) * plan.rollouts_per_step
            result = _complete(result, threshold)
            runs.append(result)
            seed_runs.append(result)
            echo(f"[{count}/{total}] {name} seed {seed}: {_describe(result)}")
        if sft_baseline:
            count += 1
            times = [r["train_seconds"] for r in seed_runs if r["error"] is None and r.get("train_seconds")]
            if not times:
                echo(f"[{count}/{total}] {SFT_NAME} seed {seed}: skipped (no successful RL run to match)")
                continue
            seconds = statistics.fmean(times)
            evaluations = max(1, math.ceil(plan.max_steps / plan.resolved["eval_every"]))
            config = dict(plan.resolved, seed=seed)
            spec = {"kind": "sft", "algorithm": SFT_NAME, "seed": seed, "config": config, "imports": list(imports),
                    "seconds": seconds, "eval_interval_s": seconds / evaluations, "batch_size": sft_batch_size}
            result = _complete(_launch(spec, output / "runs" / _run_name(SFT_NAME, seed), run_timeout), threshold)
            runs.append(result)
            echo(f"[{count}/{total}] {SFT_NAME} seed {seed} ({seconds:.1f} s, the mean RL train time): "
                 f"{_describe(result)}")
    rows = summarize(runs, threshold)
    table = markdown_table(rows, threshold)
    env, policy = plan.resolved["env"], plan.resolved["policy"]
    title = f"{env}, policy {policy}: {plan.budget_rollouts} rollouts per run, seeds {', '.join(map(str, plan.seeds))}"
    files = {name: str(output / name) for name in ("results.csv", "summary.md", "curves.png", "compare.json")}
    write_csv(runs, output / "results.csv")
    plot_curves(runs, output / "curves.png", title=title)
    settings = {
        "config": str(config_path) if config_path is not None else "(packaged default.yaml)",
        "overrides": list(overrides), "algorithms": plan.algorithms, "seeds": plan.seeds,
        "budget_rollouts": plan.budget_rollouts, "rollouts_per_step": plan.rollouts_per_step,
        "max_steps": plan.max_steps, "threshold": threshold, "sft_baseline": sft_baseline,
        "sft_batch_size": sft_batch_size if sft_baseline else None, "shared_recipe": shared_recipe,
        "imports": list(imports), "run_timeout": run_timeout, "shared": plan.resolved,
        "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
    }
    failures = [f"{r['algorithm']} seed {r['seed']}: {r['error'].splitlines()[0]}" for r in runs if r["error"]]
    summary_md = "\n".join([
        f"# Algorithm comparison: {title}", "",
        f"Equal budgets: {plan.max_steps} steps × {plan.rollouts_per_step} rollouts = "
        f"{plan.max_steps * plan.rollouts_per_step} rollouts per run; held-out: {plan.resolved['eval_size']} records "
        f"of {env} ({json.dumps(plan.resolved['eval_env_kwargs'])}), evaluated every "
        f"{plan.resolved['eval_every']} steps.", "",
        table, "",
        "Accuracy: mean ± population std over the successful seeds; step to threshold: the first evaluated step "
        f"whose held-out accuracy is ≥ {threshold:g} (median over the seeds that reached it); train s: wall time "
        "without evaluation; peak memory: the largest peak RSS over the seeds."
        + (f" The SFT row's steps are SFT optimizer steps of {sft_batch_size} demonstrations, run for the mean "
           "train time of the seed's RL runs." if sft_baseline else ""), "",
        "## Algorithm options", "",
        *[f"- {name}: `{json.dumps(plan.options[name])}`" for name in plan.algorithms], "",
        "## Notes", "", *[f"- {note}" for note in plan.notes],
        *(["", "## Failed runs", "", *[f"- {failure}" for failure in failures]] if failures else []), "",
    ])
    (output / "summary.md").write_text(summary_md)
    report = {
        "settings": settings, "notes": plan.notes,
        "algorithms": {name: {"options": plan.options[name], "dropped_options": plan.dropped[name],
                              "ignored_overrides": plan.ignored_overrides[name]} for name in plan.algorithms},
        "runs": runs, "summary": rows, "table": table, "files": files,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    (output / "compare.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dare_gym.compare --single SPEC`` runs one run (the child); anything else is
    ``dare-gym compare ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--single"] and len(argv) == 2:
        return run_single(argv[1])
    from dare_gym.cli import main as cli_main

    return cli_main(["compare", *argv])


if __name__ == "__main__":
    sys.exit(main())
