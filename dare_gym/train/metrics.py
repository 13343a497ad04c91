"""A run's metrics: one JSON object per line in ``metrics.jsonl`` (optionally mirrored to TensorBoard), and
the curves drawn from them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Appends one JSON object per line; optionally mirrors scalars to TensorBoard."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None):
        self.path = path
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard_dir))

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records logged after ``step`` (they belong to a run that did not reach a checkpoint)."""
        kept = [r for r in self.read() if r["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_metrics(history: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Reward and held-out accuracy against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    train = [r for r in history if "reward_mean" in r]
    axes[0].plot([r["step"] for r in train], [r["reward_mean"] for r in train], label="rollout reward")
    axes[0].plot([r["step"] for r in train], [r["train_accuracy"] for r in train], label="rollout accuracy", alpha=0.7)
    axes[0].set_xlabel("step")
    axes[0].set_title("training rollouts")
    axes[0].legend()
    held = [r for r in history if "heldout_accuracy" in r]
    axes[1].plot([r["step"] for r in held], [r["heldout_accuracy"] for r in held], marker="o", label="accuracy")
    axes[1].plot([r["step"] for r in held], [r["heldout_reward"] for r in held], marker=".", label="reward")
    axes[1].set_xlabel("step")
    axes[1].set_title("held-out, greedy")
    axes[1].legend()
    for axis in axes:
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


__all__ = ["METRICS_FILE", "MetricsLogger", "plot_metrics", "save_figure"]
