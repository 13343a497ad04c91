"""``dare-gym compare``: fair algorithm comparisons in one command.

Every run trains the same policy on the same env and is scored on the same held-out records, and every
run consumes the same number of rollouts (completions sampled and rewarded):

    max_steps = budget_rollouts // (prompts_per_step × group_size),   time_limit_minutes = null

The comparison that ships with the package (digitsort-v0, the tiny policy, 16 prompts × 8 completions per
step, each algorithm at its own defaults plus ``algorithm_options``; 30 steps = 3,840 rollouts per run):

    dare-gym compare --config experiments/configs/compare_default.yaml --algorithms all --seeds 0 1 2 \\
        --budget-rollouts 3840 --sft-baseline --output runs/compare

(the runs are sequential: 48 minutes for every algorithm, 3 seeds and the SFT baseline on 2 CPU cores;
results in ``experiments/results/compare/``.)

A quicker look: ``dare-gym compare --algorithms d1 --seeds 0 --budget-rollouts 1280`` (the packaged
default.yaml's recipe, 5 steps of 32 × 8).

Algorithm options. Each algorithm runs its own config's defaults (its paper's recipe) plus the config's
``algorithm_options`` for it (``experiments/configs/compare_default.yaml`` lists the changes that make each
learn at the tiny scale). The YAML's ``algorithm:`` section applies only to the algorithm it names: the
packaged default.yaml's tuned d1 recipe changes d1 and nothing else. With ``--shared-recipe`` it is one recipe
for all: ``name`` is replaced by the algorithm being run, and only the options that are fields of that
algorithm's config class are kept (the others are dropped and listed in the report); an algorithm whose config
rejects the values it keeps (an estimator or a KL weight it cannot use) runs at its own defaults instead, with
a note. ``algorithm.<field>=value`` overrides apply to every algorithm whose config has that field, and are
ignored, with a note, for the others (an override that matches no compared algorithm is an error: probably a
typo). Other dotted overrides (``eval_size=100``) set shared fields; ``max_steps``, ``time_limit_minutes``, ``seed``, ``output_dir`` and
``algorithm.name`` are set by the comparison itself. Checkpoints are written only at the end of each run.

Isolation. Each (algorithm, seed) run is a separate process (``python -m dare_gym.tools.compare.run
SPEC.json``), run one after the other, seed by seed (all algorithms for seed 0, then seed 1, ...), so that
drift in machine speed spreads over algorithms. Peak memory is the child's peak resident set size as
``wait4`` reports it (its ``ru_maxrss``). A run that raises, crashes or times out is recorded with its
error and the comparison goes on.

Timing. ``train_seconds`` is the trainer's wall time minus the time spent in held-out evaluation (the same
work for every algorithm, and not part of learning), at every point of the curve (see
:func:`dare_gym.tools.compare.run.learning_curve`); ``seconds_per_step = train_seconds / steps``;
``total_seconds`` is the child process's whole wall time (start-up, model loading, evaluation, checkpoint).

SFT baseline (``--sft-baseline``). For each seed, continued masked-diffusion SFT on gold demonstrations of
the training split (``dare_gym.core.sft.train_on_demonstrations``) from the same starting policy, with the
shared learning rate, for a wall time equal to the mean ``train_seconds`` of that seed's successful RL
runs (evaluation excluded on both sides: the SFT callback's time is not counted either). The choice of the
mean matches the baseline to a typical RL run's compute; per-algorithm times are in results.csv. It is
evaluated on the same held-out records as often as the RL runs are (the same number of evaluations, evenly
spaced in time), with the same evaluation sampler settings and ``torch_threads``. Batches are
``--sft-batch-size`` demonstrations (64); SFT stops after the first step that reaches the time, so it may
overshoot by one step (``train_seconds`` in its row is what it used). SFT sees the answers, so it is an
upper reference, not a competitor.

Out-of-tree code: ``--import MODULE`` (a module name, found in the current directory too, or a ``.py`` path)
imports a module that registers algorithms, rewards or envs, in the parent and in every run (it is recorded
in each run's config as ``imports``). The command exits 0 when at least one run succeeded, 1 when none did, 2 on a config error.

Outputs (in ``--output``, default runs/compare):

* ``results.csv``: one row per run (the SFT rows are named ``sft-baseline``), see :data:`CSV_COLUMNS`;
* ``summary.md``: a Markdown table, one row per algorithm (mean ± population std over seeds), plus notes;
* ``curves.png``: held-out accuracy against rollouts consumed (mean line, ± std band, thin per-seed lines),
  and against training seconds on a second panel, where the SFT baseline is drawn;
* ``compare.json``: settings, per-algorithm options, notes, every run with its curve, and the summary;
* ``runs/<algorithm>-seed<k>/``: each run's spec, log, result and trainer output (metrics.jsonl...).

The code is in three modules: :mod:`dare_gym.tools.compare.plan` (names, budgets, per-algorithm options),
:mod:`dare_gym.tools.compare.run` (one process per run, timing) and :mod:`dare_gym.tools.compare.report` (table, CSV,
plot). Python API: :func:`run_comparison` (everything above), :func:`plan_comparison` (the run configs without
running them), :func:`filter_algorithm_options`, :func:`summarize`, :func:`markdown_table`,
:func:`plot_curves`.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from dare_gym.tools.compare.plan import (
    ALL,
    RESERVED,
    ComparisonPlan,
    config_fields,
    filter_algorithm_options,
    plan_comparison,
    resolve_algorithms,
)
from dare_gym.tools.compare.report import (
    CSV_COLUMNS,
    SFT_NAME,
    markdown_table,
    mean_curve,
    plot_curves,
    summarize,
    summary_markdown,
    write_csv,
)
from dare_gym.tools.compare.run import complete, describe, finished_runs, launch, learning_curve, reusable, run_name
from dare_gym.core.config import ConfigError

__all__ = [
    "ALL", "CSV_COLUMNS", "RESERVED", "SFT_NAME", "ComparisonPlan", "config_fields", "filter_algorithm_options",
    "learning_curve", "markdown_table", "mean_curve", "plan_comparison", "plot_curves", "resolve_algorithms",
    "run_comparison", "summarize", "write_csv",
]


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
    shared_recipe: bool = False,
    run_timeout: float | None = None,
    resume: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every (algorithm, seed) in its own process, then write results.csv, summary.md, curves.png and
    compare.json to ``output_dir``; returns compare.json's content (its ``table`` is the Markdown table).

    ``resume``: keep each finished run of an earlier comparison in ``output_dir`` whose settings are exactly this
    one's (the same spec, and for RL runs the same resolved algorithm section, defaults included, as its
    ``config.json`` recorded), and run only the others: runs that failed or never finished, and those whose
    algorithm or settings changed since."""
    plan = plan_comparison(algorithms, seeds, budget_rollouts, config_path=config_path, overrides=overrides,
                           shared_recipe=shared_recipe, imports=imports)
    if sft_baseline and plan.resolved["eval_size"] == 0:
        raise ConfigError("--sft-baseline needs held-out evaluation: eval_size must be > 0")
    output = Path(output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    for note in plan.notes:
        echo(f"note: {note}")
    total = len(plan.algorithms) * len(plan.seeds) + (len(plan.seeds) if sft_baseline else 0)
    runs: list[dict] = []
    earlier = finished_runs(output) if resume else {}
    started = time.perf_counter()
    count = 0
    for seed in plan.seeds:
        seed_runs = []
        for name in plan.algorithms:
            count += 1
            run_dir = output / "runs" / run_name(name, seed)
            kept = False
            if name in plan.config_errors:
                result = {"algorithm": name, "seed": seed, "error": plan.config_errors[name], "steps": 0,
                          "rollouts": 0, "curve": [], "total_seconds": 0.0, "peak_memory_mb": None}
            else:
                config = plan.run_config(name, seed, run_dir / "train")
                spec = {"kind": "rl", "algorithm": name, "seed": seed, "config": config,
                        "imports": plan.shared["imports"], "rollouts_per_step": plan.rollouts_per_step}
                result = reusable(earlier, spec, run_dir)
                kept = result is not None
                if not kept:
                    result = launch(spec, run_dir, run_timeout)
                if result.get("rollouts") is None:  # killed before it could report
                    result["rollouts"] = (result.get("steps") or 0) * plan.rollouts_per_step
            result = complete(result, threshold)
            runs.append(result)
            seed_runs.append(result)
            echo(f"[{count}/{total}] {name} seed {seed}: {describe(result)}" + (" (kept from the earlier run)" if kept else ""))
        if sft_baseline:
            count += 1
            times = [r["train_seconds"] for r in seed_runs if r["error"] is None and r.get("train_seconds")]
            if not times:
                echo(f"[{count}/{total}] {SFT_NAME} seed {seed}: skipped (no successful RL run to match)")
                continue
            seconds = statistics.fmean(times)
            evaluations = max(1, math.ceil(plan.max_steps / plan.resolved["eval_every"]))
            config = dict(plan.resolved, seed=seed)
            spec = {"kind": "sft", "algorithm": SFT_NAME, "seed": seed, "config": config,
                    "imports": plan.shared["imports"], "seconds": seconds, "eval_interval_s": seconds / evaluations,
                    "batch_size": sft_batch_size}
            run_dir = output / "runs" / run_name(SFT_NAME, seed)
            result = reusable(earlier, spec, run_dir)
            kept = result is not None
            result = complete(result if kept else launch(spec, run_dir, run_timeout), threshold)
            runs.append(result)
            echo(f"[{count}/{total}] {SFT_NAME} seed {seed} ({seconds:.1f} s, the mean RL train time): "
                 f"{describe(result)}" + (" (kept from the earlier run)" if kept else ""))
    rows = summarize(runs, threshold)
    table = markdown_table(rows, threshold)
    env, policy = plan.resolved["env"], plan.resolved["policy"]
    title = (f"{env}, policy {policy}: {plan.budget_rollouts} rollouts per run, "
             f"{len(plan.seeds)} seed{'s' if len(plan.seeds) > 1 else ''}")
    files = {name: str(output / name) for name in ("results.csv", "summary.md", "curves.png", "compare.json")}
    write_csv(runs, output / "results.csv")
    plot_curves(runs, output / "curves.png", title=title)
    (output / "summary.md").write_text(summary_markdown(
        plan, runs, table, title=title, threshold=threshold, sft_batch_size=sft_batch_size if sft_baseline else None))
    settings = {
        "config": str(config_path) if config_path is not None else "(packaged default.yaml)",
        "overrides": list(overrides), "algorithms": plan.algorithms, "seeds": plan.seeds,
        "budget_rollouts": plan.budget_rollouts, "rollouts_per_step": plan.rollouts_per_step,
        "max_steps": plan.max_steps, "threshold": threshold, "sft_baseline": sft_baseline,
        "sft_batch_size": sft_batch_size if sft_baseline else None, "shared_recipe": shared_recipe,
        "imports": plan.shared["imports"], "run_timeout": run_timeout, "shared": plan.resolved,
        "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
    }
    report = {
        "settings": settings, "notes": plan.notes,
        "algorithms": {name: {"options": plan.options[name], "dropped_options": plan.dropped[name],
                              "ignored_overrides": plan.ignored_overrides[name]} for name in plan.algorithms},
        "runs": runs, "summary": rows, "table": table, "files": files,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    (output / "compare.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
