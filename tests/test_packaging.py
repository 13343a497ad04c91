"""The built wheel, installed (not editable) into a clean virtual environment, works outside the checkout.

Packages and data files are discovered by setup.py; this test walks the source folders on its own and checks
that the wheel holds every module and every data file of them, then runs the installed package from a folder
far from the checkout: imports of every subpackage, the console script, the built-in policies, one training
step. The clean environment borrows this one's third-party packages through a ``.pth`` line (no downloads); the
editable install of the checkout is not visible there (its finder is only activated by a ``.pth`` file of this
environment's own, which the borrowed path does not run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"dare_gym": "dare_gym", "envs": "dare_gym/envs", "rewards": "dare_gym/rewards",
          "algorithms": "dare_gym/algorithms"}


def expected_files() -> set[str]:
    """Every file the wheel must hold, from the source folders (caches left out)."""
    files = set()
    for folder, target in MAPPED.items():
        for path in (ROOT / folder).rglob("*"):
            relative = path.relative_to(ROOT / folder)
            if path.is_file() and "__pycache__" not in relative.parts and path.suffix != ".pyc":
                if folder == "dare_gym" and relative.parts[0] in MAPPED:  # not a mapped root's own files
                    continue
                files.add(f"{target}/{relative.as_posix()}")
    return files


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a clean venv with the wheel installed, the wheel's file names)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    for name in [*MAPPED, "setup.py", "pyproject.toml", "README.md"]:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(work / "dist"), "-q"], check=True, capture_output=True, text=True)
    (wheel,) = (work / "dist").glob("dare_gym-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    str(wheel), "-q"], check=True, capture_output=True, text=True)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    return python, names


def run_outside(python: Path, code: str, tmp_path: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    result = subprocess.run([str(python), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_wheel_holds_every_module_and_data_file_of_the_source_folders(installed):
    _, names = installed
    missing = expected_files() - names
    assert not missing, f"the wheel lacks {sorted(missing)[:20]}"
    assert "dare_gym/samplers/llada.py" in names and "dare_gym/models/tiny_checkpoint/model.safetensors" in names


def test_the_installed_wheel_imports_and_generates_outside_the_checkout(installed, tmp_path):
    python, _ = installed
    code = (
        "import json, pkgutil, importlib, dare_gym\n"
        "modules = [m.name for m in pkgutil.walk_packages(dare_gym.__path__, 'dare_gym.')\n"
        "           if not m.name.endswith('__main__')]  # running it is the command line\n"
        "for name in modules: importlib.import_module(name)\n"
        "policy = dare_gym.load_policy('tiny')\n"
        "out = policy.generate(['sort 583920\\n'], gen_length=8, steps=8, block_length=8, temperature=0.0)\n"
        "print(json.dumps({'file': dare_gym.__file__, 'modules': modules, 'text': out[0].text,\n"
        "                  'envs': dare_gym.list_envs()}))\n"
    )
    report = json.loads(run_outside(python, code, tmp_path))
    assert not report["file"].startswith(str(ROOT)), report["file"]  # the wheel's copy, not the checkout
    assert {"dare_gym.samplers.llada", "dare_gym.envs.gsm8k", "dare_gym.rewards.sandbox",
            "dare_gym.algorithms.d1"} <= set(report["modules"])
    assert report["text"] and "digitsort-v0" in report["envs"]


def test_the_installed_console_script_trains_one_step_outside_the_checkout(installed, tmp_path):
    python = installed[0]
    script = python.parent / "dare-gym"
    result = subprocess.run([str(script), "train", "max_steps=1", "prompts_per_step=2", "group_size=2",
                             "eval_size=4", f"output_dir={tmp_path / 'run'}", "progress=false"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 1 and (tmp_path / "run" / "final_policy" / "model.safetensors").is_file()
