"""`dare-gym standin FAMILY --from FOLDER --out DIR`: a real-format tiny checkpoint every command takes."""

from __future__ import annotations

import json

from helpers import run_cli as run


def test_a_standin_from_the_real_files_is_a_policy_eval_takes(families_dir, tmp_path):
    out = run("standin", "llada", "--from", str(families_dir / "LLaDA-8B-Instruct"), "--out", str(tmp_path / "llada"))
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "llada"
    real = json.loads((families_dir / "LLaDA-8B-Instruct" / "config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == real["model_type"] and config["auto_map"] == real["auto_map"]
    assert config["n_layers"] == 2 < real["n_layers"] and (folder / "model.safetensors").is_file()
    assert f"dare-gym eval --policy {folder}" in out.stdout
    scored = run("eval", "--policy", str(folder), "--limit", "2", "--gen", "gen_length=4", "steps=4", "block_length=4")
    assert scored.returncode == 0, scored.stderr
    report = json.loads(scored.stdout)
    assert report["records"] == 2 and report["generation"]["gen_length"] == 4


def test_standin_errors_name_the_bad_value(tmp_path):
    out = run("standin", "lada", "--out", str(tmp_path / "x"))
    assert out.returncode == 2 and "unknown model family 'lada'; registered: " in out.stderr
    out = run("standin", "llada", "--from", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert out.returncode == 2 and f"--from: '{tmp_path / 'nope'}' has no config.json" in out.stderr
    assert not (tmp_path / "x").exists()
