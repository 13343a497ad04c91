"""Reporting a comparison: per-algorithm summary rows, the Markdown table, results.csv and curves.png."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Sequence

SFT_NAME = "sft-baseline"
CSV_COLUMNS = [
    "algorithm", "seed", "final_heldout_accuracy", "initial_heldout_accuracy", "step_to_threshold",
    "rollouts_to_threshold", "seconds_to_threshold", "steps", "rollouts", "seconds_per_step", "train_seconds",
    "total_seconds", "peak_memory_mb", "error",
]
# One colour per algorithm, chosen so that any two of the first 15 differ clearly (CIELAB distance >= 25;
# tab20, used before, pairs each hue with its light tint); past 20 algorithms the line style changes too.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#ff00ff", "#00008b", "#556b2f", "#ff1493", "#b8860b", "#911eb4", "#800000", "#4363d8", "#008080", "#808000",
)
LINE_STYLES = ("-", "--", ":", "-.")
SFT_COLOR = "black"


def algorithm_style(index: int) -> tuple[str, str]:
    """The colour and line style of the ``index``-th algorithm of a plot."""
    return PALETTE[index % len(PALETTE)], LINE_STYLES[(index // len(PALETTE)) % len(LINE_STYLES)]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator, as papers report over seeds)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


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
        f"| algorithm | runs ok | held-out acc. before | final held-out acc. (mean ± sample std) | "
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


def mean_curve(runs: Sequence[dict], x_key: str):
    """The seeds' mean held-out accuracy and its std at each evaluation they all reached, at the seeds' mean
    ``x_key`` there (rollouts, or training seconds); the line and its band share these points, so they end
    together. None when no run has a curve."""
    import numpy as np

    curves = [[p for p in r.get("curve") or [] if p.get(x_key) is not None] for r in runs]
    curves = [c for c in curves if c]
    if not curves:
        return None
    points = min(len(c) for c in curves)  # equal budgets evaluate at the same steps; a cut-short run ends early
    x = np.array([[c[k][x_key] for k in range(points)] for c in curves], float)
    y = np.array([[c[k]["heldout_accuracy"] for k in range(points)] for c in curves], float)
    return x.mean(0), y.mean(0), y.std(0, ddof=1) if len(y) > 1 else np.zeros_like(y[0]), curves


def plot_curves(runs: Sequence[dict], path: Path, title: str = "") -> Path:
    """Held-out accuracy against rollouts (left) and against training seconds, with the SFT baseline (right):
    one colour per algorithm, its mean over seeds with a ± std band, and thin per-seed lines for up to six
    algorithms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    names = list(dict.fromkeys(r["algorithm"] for r in runs if r["algorithm"] != SFT_NAME))
    many = len(names) > 6  # per-seed lines would bury the means
    for index, name in enumerate(names):
        ok = [r for r in runs if r["algorithm"] == name and r["error"] is None and r.get("curve")]
        color, style = algorithm_style(index)
        for axis, key in ((left, "rollouts"), (right, "train_seconds")):
            curve = mean_curve(ok, key)
            if curve is None:
                continue
            x, mean, std, seeds = curve
            axis.plot(x, mean, color=color, ls=style, lw=1.8, label=f"{name} ({len(ok)} seeds)")
            axis.fill_between(x, mean - std, mean + std, color=color, alpha=0.08 if many else 0.18, linewidth=0)
            for seed in [] if many else seeds:
                axis.plot([p[key] for p in seed], [p["heldout_accuracy"] for p in seed], color=color, alpha=0.35,
                          lw=0.7)
    sft = [r for r in runs if r["algorithm"] == SFT_NAME and r["error"] is None and r.get("curve")]
    curve = mean_curve(sft, "train_seconds")
    if curve is not None:
        x, mean, std, seeds = curve
        right.plot(x, mean, color=SFT_COLOR, ls="--", label=f"continued SFT on gold ({len(sft)} seeds)")
        right.fill_between(x, mean - std, mean + std, color=SFT_COLOR, alpha=0.12, linewidth=0)
    left.set_title("Held-out accuracy by rollouts")
    right.set_title("Held-out accuracy by training time")
    left.set_xlabel("rollouts (completions sampled)")
    right.set_xlabel("training seconds (evaluation excluded)")
    for axis in (left, right):
        axis.set_ylabel("held-out accuracy (greedy)")
        axis.grid(alpha=0.3)
    handles, labels = right.get_legend_handles_labels()
    if handles:  # one legend for both panels, outside them
        figure.legend(handles, labels, loc="center left", bbox_to_anchor=(0.80, 0.5), fontsize=8, frameon=False)
    if title:
        figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 0.80 if handles else 1, 1))
    from dare_gym.train.metrics import save_figure

    return save_figure(figure, path)


def summary_markdown(plan, runs: Sequence[dict], table: str, *, title: str, threshold: float,
                     sft_batch_size: int | None) -> str:
    """summary.md: the settings in a sentence, the table, how to read it, each algorithm's options, notes and
    failed runs."""
    resolved = plan.resolved
    failures = [f"{r['algorithm']} seed {r['seed']}: {r['error'].splitlines()[0]}" for r in runs if r["error"]]
    return "\n".join([
        f"# Algorithm comparison: {title}", "",
        f"Equal budgets: {plan.max_steps} steps × {plan.rollouts_per_step} rollouts = "
        f"{plan.max_steps * plan.rollouts_per_step} rollouts per run; held-out: {resolved['eval_size']} records "
        f"of {resolved['env']} ({json.dumps(resolved['eval_env_kwargs'])}), evaluated every "
        f"{resolved['eval_every']} steps; seeds {', '.join(map(str, plan.seeds))}.", "",
        table, "",
        "Accuracy: mean ± sample std (n − 1) over the successful seeds; step to threshold: the first evaluated step "
        f"whose held-out accuracy is ≥ {threshold:g} (median over the seeds that reached it); train s: wall time "
        "without evaluation; peak memory: the largest peak RSS over the seeds."
        + (f" The SFT row's steps are SFT optimizer steps of {sft_batch_size} demonstrations, run for the mean "
           "train time of the seed's RL runs." if sft_batch_size else ""), "",
        "## Algorithm options", "",
        *[f"- {name}: `{json.dumps(plan.options[name])}`" for name in plan.algorithms], "",
        "## Notes", "", *[f"- {note}" for note in plan.notes],
        *(["", "## Failed runs", "", *[f"- {failure}" for failure in failures]] if failures else []), "",
    ])
