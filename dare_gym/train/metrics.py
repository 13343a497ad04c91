"""A run's metrics: one JSON object per line in ``metrics.jsonl`` (optionally mirrored to TensorBoard and to
Weights & Biases), a few of its rollouts every ``log_every`` steps in ``samples.jsonl`` (what the policy writes,
which is how reward hacking is caught), and the curves drawn from the metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


class MetricsLogger:
    """Appends one JSON object per line; optionally mirrors scalars (and samples, as text or a table) to
    TensorBoard and to Weights & Biases (``wandb``: the keyword arguments of ``wandb.init``, e.g.
    ``{"project": "dllm-rl", "mode": "offline"}``; needs the ``wandb`` extra)."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, *, wandb: dict[str, Any] | None = None,
                 run_config: dict[str, Any] | None = None):
        self.path = path
        self.samples_path = path.with_name(SAMPLES_FILE)
        self.writer = None
        self.wandb_run = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard_dir))
        if wandb is not None:
            self.wandb_run = start_wandb(dict(wandb), default_dir=path.parent, run_config=run_config)

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, record["step"])
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=record["step"])

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """A few rollouts of step ``step`` (prompt, completion, reward, correct), to ``samples.jsonl`` and, as a
        Markdown table or a ``wandb.Table``, to the other loggers."""
        with self.samples_path.open("a") as handle:
            for row in rows:
                handle.write(json.dumps({"step": step, **row}) + "\n")
        if self.writer is not None:
            self.writer.add_text("samples", samples_markdown(rows), step)
        if self.wandb_run is not None:
            import wandb

            columns = ["prompt", "completion", "reward", "correct"]
            table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
            self.wandb_run.log({"samples": table}, step=step)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records (and samples) logged after ``step`` (they belong to a run that did not reach a
        checkpoint)."""
        for path in (self.path, self.samples_path):
            if not path.exists():
                continue
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))
            os.replace(tmp, path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb(settings: dict[str, Any], *, default_dir: Path, run_config: dict[str, Any] | None):
    """``wandb.init(**settings)`` with the run's folder as its ``dir`` unless set; a missing package is a clear
    error naming the extra."""
    try:
        import wandb
    except ImportError:
        raise ImportError("wandb: the Weights & Biases logger needs the wandb package: "
                          "pip install 'dare-gym[wandb]'") from None
    settings.setdefault("dir", str(default_dir))
    return wandb.init(config=run_config, **settings)


def samples_markdown(rows: list[dict[str, Any]]) -> str:
    """Rollouts as a Markdown table (TensorBoard's text panel renders it)."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", "\\n")

    lines = ["| prompt | completion | reward | correct |", "|---|---|---|---|"]
    lines += [f"| {cell(r['prompt'])} | {cell(r['completion'])} | {r['reward']:.3f} | {r['correct']} |" for r in rows]
    return "\n".join(lines)


# The panels of curves.png after the reward and held-out ones: (title, [(metric, label)]); a panel is drawn when
# the run logged one of its metrics (algorithms log different ones: no KL without a reference, say).
TRAINING_PANELS = (
    ("KL", [("kl_ref", "to the reference"), ("approx_kl_old", "to the rollout policy")]),
    ("entropy", [("entropy", "token entropy")]),
    ("clip fraction", [("clip_fraction", "clipped tokens")]),
    ("completion length (tokens)", [("completion_length", "mean")]),
    ("seconds per step", [("time_step", "total"), ("time_rollout", "rollout"), ("time_update", "update")]),
    ("learning rate", [("learning_rate", "rate")]),
)


def step_times(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training records with ``time_step``: the wall time between consecutive records' ``elapsed_s``."""
    rows = []
    for before, record in zip(history, history[1:]):
        if "reward_mean" in record and "elapsed_s" in before and record["step"] == before["step"] + 1:
            rows.append(dict(record, time_step=record["elapsed_s"] - before["elapsed_s"]))
        else:
            rows.append(record)
    return rows


def curve_panels(history: list[dict[str, Any]]) -> list[tuple[str, list[tuple[str, str]]]]:
    """The panels of :data:`TRAINING_PANELS` that ``history`` has a metric of, with those metrics."""
    present = {key for record in step_times(history) for key in record}
    panels = []
    for title, metrics in TRAINING_PANELS:
        shown = [(key, label) for key, label in metrics if key in present]
        if shown:
            panels.append((title, shown))
    return panels


def plot_metrics(history: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Reward and held-out accuracy against step, then KL, entropy, clip fraction, completion length, seconds
    per step and learning rate where the run logged them, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = curve_panels(history)
    columns = 4
    rows = max(1, -(-(2 + len(panels)) // columns))
    figure, grid = plt.subplots(rows, columns if panels else 2, figsize=(4.2 * (columns if panels else 2), 3.4 * rows),
                                squeeze=False)
    axes = list(grid.flat)
    train = [r for r in history if "reward_mean" in r]
    axes[0].plot([r["step"] for r in train], [r["reward_mean"] for r in train], label="rollout reward")
    axes[0].plot([r["step"] for r in train], [r["train_accuracy"] for r in train], label="rollout accuracy", alpha=0.7)
    axes[0].set_title("training rollouts")
    axes[0].legend()
    held = [r for r in history if "heldout_accuracy" in r]
    axes[1].plot([r["step"] for r in held], [r["heldout_accuracy"] for r in held], marker="o", label="accuracy")
    axes[1].plot([r["step"] for r in held], [r["heldout_reward"] for r in held], marker=".", label="reward")
    axes[1].set_title("held-out, greedy")
    axes[1].legend()
    timed = step_times(history)
    for axis, (panel, metrics) in zip(axes[2:], panels):
        for key, label in metrics:
            points = [(r["step"], r[key]) for r in timed if key in r]
            axis.plot([s for s, _ in points], [v for _, v in points], label=label)
        axis.set_title(panel)
        if len(metrics) > 1:
            axis.legend()
    for axis in axes[2 + len(panels):]:
        axis.set_visible(False)
    for axis in axes:
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path)


def save_figure(figure, path: Path) -> Path:
    """Write a matplotlib figure as a PNG atomically (a reader never sees half a file) and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    os.replace(tmp, path)
    return path


__all__ = ["METRICS_FILE", "SAMPLES_FILE", "MetricsLogger", "curve_panels", "plot_metrics", "save_figure"]
