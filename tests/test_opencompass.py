"""``dare-gym opencompass``: config writing, summary parsing and failure reports, and (slow: it installs OpenCompass
in a venv of its own the first time, about 6.5 minutes on 2 cores) a real run against the tiny policy."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from helpers import run_cli

from dare_gym.tools.opencompass import (DatasetConfig, OpenCompassInputError, check_custom_dataset, config_source,
                                  failure_reason, find_dataset_configs, link_local_data, read_summary)

DIGITSORT = [("sort 583920\n", "035589"), ("sort 9381\n", "1389"), ("sort 12\n", "12"), ("sort 4040\n", "0044"),
             ("sort 77102\n", "01277"), ("sort 655001\n", "001556")]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    return path


def test_the_config_is_python_that_points_opencompass_at_the_server(tmp_path):
    custom = write_jsonl(tmp_path / "digitsort.jsonl", DIGITSORT)
    gsm8k = DatasetConfig("gsm8k", "opencompass.configs.datasets.gsm8k.gsm8k_gen", ("gsm8k_datasets",))
    text = config_source(datasets=[gsm8k], custom=[custom], model_name="runs/x", base_url="http://127.0.0.1:9/v1",
                         tokenizer_path="/ckpt", max_out_len=64, max_seq_len=256, batch_size=8, workers=8, limit=3,
                         abbr="x")
    compile(text, "opencompass_config.py", "exec")
    assert "    from opencompass.configs.datasets.gsm8k.gsm8k_gen import gsm8k_datasets" in text
    assert "datasets += gsm8k_datasets" in text and f"path={str(custom)!r}" in text
    for piece in ("openai_api_base='http://127.0.0.1:9/v1'", "tokenizer_path='/ckpt'", "query_per_second=1000",
                  "path='runs/x'", "max_seq_len=256", "max_out_len=64", "'[0:3]'", "NaivePartitioner"):
        assert piece in text


def test_the_summary_csv_marks_tasks_without_a_score(tmp_path):
    summary = tmp_path / "summary.csv"
    summary.write_text("dataset,version,metric,mode,tiny\ndigitsort,abc123,accuracy,gen,50.00\ntoolong,-,-,-,-\n")
    rows = read_summary(summary, "tiny")
    assert [(r.dataset, r.metric, r.score) for r in rows] == [("digitsort", "accuracy", 50.0), ("toolong", "-", None)]
    with pytest.raises(Exception, match="no column for model 'other'"):
        read_summary(summary, "other")


def test_a_failed_task_is_named_with_the_error_from_its_log(tmp_path):
    log = tmp_path / "logs" / "infer" / "tiny" / "toolong.out"
    log.parent.mkdir(parents=True)
    log.write_text("Traceback (most recent call last):\n  File x\nValueError: Input length (306) exceeds max_seq_len "
                   "(256)\n")
    assert failure_reason(tmp_path, "tiny", "toolong").startswith("ValueError: Input length (306) exceeds")
    assert "no score and no error in its logs" in failure_reason(tmp_path, "tiny", "other")


def test_dataset_names_resolve_to_opencompass_configs(tmp_path):
    root = tmp_path / "opencompass" / "configs" / "datasets"
    (root / "gsm8k").mkdir(parents=True)
    (root / "gsm8k" / "gsm8k_gen.py").write_text("with read_base():\n    from .gsm8k_gen_1d7fe4 import gsm8k_datasets\n")
    (root / "math").mkdir()
    (root / "math" / "math_prm800k_500_gen.py").write_text("math_datasets = [dict(abbr='math-500')]\n")
    found = find_dataset_configs(root, ["gsm8k", "math500"])
    assert found == [DatasetConfig("gsm8k", "opencompass.configs.datasets.gsm8k.gsm8k_gen", ("gsm8k_datasets",)),
                     DatasetConfig("math500", "opencompass.configs.datasets.math.math_prm800k_500_gen",
                                   ("math_datasets",))]
    with pytest.raises(OpenCompassInputError, match="no OpenCompass dataset config named 'gsm8k_gne'; close: gsm8k_gen"):
        find_dataset_configs(root, ["gsm8k_gne"])


@pytest.mark.parametrize("content,message", [("{\"question\": \"q\"}\n", "digits.jsonl:1: missing field(s) answer"),
                                             ("not json\n", "digits.jsonl:1: not JSON")])
def test_a_bad_custom_dataset_is_named_with_its_line(tmp_path, content, message):
    path = tmp_path / "digits.jsonl"
    path.write_text(content)
    with pytest.raises(OpenCompassInputError, match=re.escape(message)):
        check_custom_dataset(path)


def test_local_benchmark_files_are_linked_where_opencompass_looks(tmp_path):
    source = tmp_path / "data"
    (source / "gsm8k").mkdir(parents=True)
    (source / "gsm8k" / "test.jsonl").write_text("{}\n")
    assert link_local_data(tmp_path / "cache", source) == ["gsm8k"]
    assert (tmp_path / "cache" / "data" / "gsm8k" / "test.jsonl").read_text() == "{}\n"
    assert link_local_data(tmp_path / "cache", source) == []  # already there


def run_opencompass(*args, timeout=1800) -> subprocess.CompletedProcess:
    return run_cli("opencompass", *args, timeout=timeout)


@pytest.mark.parametrize("argv,message", [([], "give --datasets NAME ... and/or --custom-dataset FILE.jsonl"),
                                          (["--custom-dataset", "no/such.jsonl"], "--custom-dataset: no file"),
                                          (["--limit", "0", "--datasets", "gsm8k"], "--limit must be >= 1, got 0")])
def test_usage_errors_are_one_line_before_anything_is_installed(argv, message, capsys, tmp_path):
    from dare_gym.tools.cli import main

    assert main(["opencompass", "tiny", "--venv", str(tmp_path / "never"), *argv]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dare-gym opencompass: error: ") and message in error and "\n" not in error
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_opencompass_scores_the_tiny_policy_and_fails_loudly_on_a_failed_task(tmp_path, tiny_policy):
    good = write_jsonl(tmp_path / "digitsort.jsonl", DIGITSORT)
    too_long = write_jsonl(tmp_path / "toolong.jsonl", [("sort " + "1" * 300 + "\n", "1")])
    out = run_opencompass("tiny", "--custom-dataset", str(good), "--custom-dataset", str(too_long),
                  "--work-dir", str(tmp_path / "work"))
    # OpenCompass itself exits 0 here; the command reads the summary and names the task that failed
    assert out.returncode == 1, out.stderr
    assert "error: task tiny/toolong failed: ValueError: Input length (306) exceeds max_seq_len (256)" in out.stderr
    expected = sum(c.text == a for c, (_, a) in zip(tiny_policy.generate([q for q, _ in DIGITSORT]), DIGITSORT))
    assert f"| digitsort | accuracy | {100 * expected / len(DIGITSORT):.2f} |" in out.stdout
    result = json.loads((tmp_path / "work" / "result.json").read_text())
    assert list(result["failures"]) == ["tiny/toolong"] and Path(result["summary_csv"]).is_file()
    # the venv is reused: a name OpenCompass has no config for is a usage error, found at once
    unknown = run_opencompass("tiny", "--datasets", "gsm8k_gne", "--work-dir", str(tmp_path / "work2"), timeout=600)
    assert unknown.returncode == 2 and "no OpenCompass dataset config named 'gsm8k_gne'" in unknown.stderr
    assert "installing OpenCompass" not in unknown.stderr
