"""The dare-gym command line, run as a user would, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "dare_gym.cli"]


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env=dict(os.environ, TQDM_DISABLE="1"))


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "dare-gym"
    assert script.exists(), "pip install -e . should install the dare-gym console script"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "train" in out.stdout


@pytest.mark.parametrize("command", ["train", "eval", "envs", "algorithms", "compare"])
def test_every_subcommand_has_help(command):
    out = run(command, "--help")
    assert out.returncode == 0 and out.stdout.startswith(f"usage: dare-gym {command}")


def test_envs_and_algorithms_list_what_is_registered():
    envs = run("envs").stdout
    assert "digitsort-v0" in envs and "gsm8k-v0" in envs
    assert '"epsilon": 0.5' in run("algorithms").stdout


def test_eval_scores_the_tiny_policy(tmp_path):
    out = run("eval", "--limit", "40", "--output", str(tmp_path / "eval.json"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["records"] == 40 and 0.0 <= report["accuracy"] <= 1.0
    assert len(json.loads((tmp_path / "eval.json").read_text())["completions"]) == 40


def test_train_rejects_a_bad_override_naming_it():
    out = run("train", "algorithm.beta=lots")
    assert out.returncode == 2 and "algorithm.beta: expected a number, got 'lots'" in out.stderr


def test_train_runs_and_prints_before_and_after(tmp_path):
    out = run("train", f"output_dir={tmp_path / 'run'}", "max_steps=2", "eval_size=32", "eval_every=2",
              "prompts_per_step=4")
    assert out.returncode == 0, out.stderr
    assert "held-out greedy accuracy: before" in out.stdout
    assert (tmp_path / "run" / "curves.png").exists()
    resumed = run("train", "--resume", f"output_dir={tmp_path / 'run'}", "max_steps=3", "eval_size=32",
                  "eval_every=2", "prompts_per_step=4")
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]
