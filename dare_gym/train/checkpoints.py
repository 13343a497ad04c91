"""Checkpoint folders written atomically: ``checkpoints/step-N`` is built in a temporary folder and renamed
into place, then the ``latest`` pointer is replaced, so a run killed at any moment leaves the previous
checkpoint whole."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "trainer_state.pt"  # tensors: optimizer, random streams, algorithm state
INFO_FILE = "trainer_state.json"  # step, elapsed seconds, the config


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_checkpoint(root: Path, step: int, *, save_policy: Callable[[Path], None], state: dict[str, Any],
                     info: dict[str, Any], keep: int) -> Path:
    """Write ``root/step-N`` (the policy through ``save_policy(folder)``, ``state`` with ``torch.save``, ``info``
    as JSON) atomically, point ``latest`` at it and keep the newest ``keep`` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_policy(tmp / "policy")
    torch.save(state, tmp / STATE_FILE)
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_text(root / LATEST_FILE, final.name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The folder ``latest`` points at, or None."""
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if path.is_dir() else None


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, info) of a checkpoint folder."""
    return torch.load(path / STATE_FILE, weights_only=False), json.loads((path / INFO_FILE).read_text())


__all__ = ["CHECKPOINT_DIR", "LATEST_FILE", "atomic_write_text", "write_checkpoint", "latest_checkpoint",
           "read_checkpoint"]
