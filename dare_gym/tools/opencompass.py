"""OpenCompass benchmarks through ``dare-gym serve``: ``dare-gym opencompass <policy> --datasets gsm8k math500``.

OpenCompass 0.5.4 pins ``numpy<2`` and ``datasets<4``, which conflict with this project, so it lives in a virtual
environment of its own and nothing of it is imported here. The command

1. creates or reuses that venv (:func:`ensure_venv`; default ``~/.cache/dare_gym/opencompass-venv``): ``torch`` at
   this environment's version first (so no multi-GB CUDA build is pulled onto a CPU machine), then
   ``opencompass==0.5.4`` with ``pyarrow<22`` (newer pyarrow needs numpy 2). A marker file records a finished
   install, so the next run starts at once;
2. serves the policy on a free loopback port in this process (:class:`dare_gym.tools.serve.ServerThread`);
3. writes an OpenCompass config (:func:`config_source`): OpenCompass's own dataset configs by name (``gsm8k`` is
   ``gsm8k_gen``, ``math500`` is ``math_prm800k_500_gen``; any config file name of its ``configs/datasets`` works)
   and local files in OpenCompass's custom QA format (``--custom-dataset x.jsonl``, records
   ``{"question": ..., "answer": ...}``, scored by exact match), for its ``OpenAISDK`` model pointed at the server
   with the checkpoint's own tokenizer (``tokenizer_path``, so nothing is downloaded) and a raised
   ``query_per_second``; one task per dataset, so one failing dataset does not take the others down;
4. runs ``opencompass`` offline (``HF_HUB_OFFLINE=1``; datasets come from ``COMPASS_DATA_CACHE``, where GSM8K and
   MBPP are linked from ``DARE_GYM_DATA_DIR`` when it has them);
5. reads the summary CSV (:func:`read_summary`) and fails loudly (:class:`OpenCompassFailed`, the task and the
   error from its log named) when any task has no score, because ``opencompass`` exits 0 even when every task
   failed.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

OPENCOMPASS_VERSION = "0.5.4"
EXTRA_PINS = ("pyarrow<22",)  # pyarrow 22+ is built for numpy 2, which OpenCompass refuses
DEFAULT_VENV = Path("~/.cache/dare_gym/opencompass-venv")
DEFAULT_DATA = Path("~/.cache/dare_gym/opencompass-data")
MARKER = "dare_gym_opencompass.json"
ALIASES = {"gsm8k": "gsm8k_gen", "math": "math_gen", "math500": "math_prm800k_500_gen", "humaneval": "humaneval_gen",
           "mbpp": "mbpp_gen"}
"""Short names for the benchmarks of DARE's table; any other name is looked up as a config file name."""
LINKED_DATA = {"gsm8k": ("gsm8k", "gsm8k"), "mbpp/mbpp.jsonl": ("mbpp/mbpp.jsonl", "mbpp/mbpp.jsonl")}
"""OpenCompass data paths (under ``COMPASS_DATA_CACHE/data``) linked from ``DARE_GYM_DATA_DIR``, same format."""


class OpenCompassError(RuntimeError):
    """OpenCompass could not be installed or run, or a dataset name is unknown."""


class OpenCompassInputError(OpenCompassError):
    """A bad dataset name or custom dataset file (a usage error)."""


class OpenCompassFailed(OpenCompassError):
    """The run finished but some tasks have no score; ``failures`` maps each to the reason from its log."""

    def __init__(self, failures: dict[str, str], summary: "OpenCompassResult"):
        self.failures, self.summary = failures, summary
        lines = "; ".join(f"{task}: {why}" for task, why in failures.items())
        super().__init__(f"{len(failures)} OpenCompass task(s) failed: {lines}")


# ------------------------------------------------------------------------------------------- the venv


@dataclass
class Venv:
    path: Path
    install_seconds: float  # 0.0 when an existing install was reused

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def opencompass(self) -> Path:
        return self.path / "bin" / "opencompass"


def torch_requirement() -> str:
    """``torch==<the version running here>`` (local tag such as ``+cpu`` dropped), installed first in the venv."""
    import torch

    return f"torch=={torch.__version__.split('+')[0]}"


def ensure_venv(path: str | os.PathLike = DEFAULT_VENV, *, python: str = sys.executable,
                log: Callable[[str], None] = print) -> Venv:
    """Create OpenCompass's venv at ``path`` (or reuse a finished one) and return it. Concurrent callers wait for
    one install (a lock file beside the venv). Pip's output goes to ``<venv>/install.log``."""
    venv = Path(path).expanduser().resolve()
    venv.parent.mkdir(parents=True, exist_ok=True)
    wanted = {"opencompass": OPENCOMPASS_VERSION, "torch": torch_requirement(), "pins": list(EXTRA_PINS)}
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = venv / MARKER
        if marker.is_file() and (venv / "bin" / "opencompass").exists():
            recorded = json.loads(marker.read_text())
            if {k: recorded.get(k) for k in wanted} == wanted:
                return Venv(venv, 0.0)
        log(f"installing OpenCompass {OPENCOMPASS_VERSION} into {venv} (once; a few minutes)")
        start = time.monotonic()
        steps = [[python, "-m", "venv", str(venv)],
                 [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", wanted["torch"]],
                 [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                  f"opencompass=={OPENCOMPASS_VERSION}", *EXTRA_PINS]]
        with open(venv.parent / f"{venv.name}-install.log", "w") as out:
            for step in steps:
                out.write(f"$ {' '.join(step)}\n")
                out.flush()
                if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                    raise OpenCompassError(f"installing OpenCompass failed at `{' '.join(step[-2:])}`; see {out.name}")
        seconds = time.monotonic() - start
        marker.write_text(json.dumps(dict(wanted, install_seconds=round(seconds, 1)), indent=2) + "\n")
        log(f"installed OpenCompass in {seconds:.0f} s")
        return Venv(venv, seconds)


def site_packages(venv: Venv) -> Path:
    out = subprocess.run([str(venv.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


# ------------------------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class DatasetConfig:
    """One OpenCompass dataset config: its module (``opencompass.configs.datasets.gsm8k.gsm8k_gen``) and the
    ``*_datasets`` variables it defines."""

    name: str
    module: str
    variables: tuple[str, ...]


def find_dataset_configs(configs_dir: Path, names: Sequence[str]) -> list[DatasetConfig]:
    """Resolve dataset names (an alias from :data:`ALIASES` or a config file name) in OpenCompass's
    ``configs/datasets`` folder; an unknown or ambiguous name is an :class:`OpenCompassError` naming it."""
    found = []
    for name in names:
        stem = ALIASES.get(name, name).removesuffix(".py")
        matches = sorted(configs_dir.rglob(f"{stem}.py"))
        if len(matches) != 1:
            import difflib

            close = difflib.get_close_matches(stem, [p.stem for p in configs_dir.rglob("*.py")], n=5)
            what = "no" if not matches else f"{len(matches)}"
            raise OpenCompassInputError(f"--datasets: {what} OpenCompass dataset config named {stem!r}"
                                   + (f" (from {name!r})" if stem != name else "")
                                   + (f"; close: {', '.join(close)}" if close else "")
                                   + f"; aliases: {', '.join(sorted(ALIASES))}")
        text = matches[0].read_text()
        variables = tuple(dict.fromkeys(re.findall(r"^(\w+_datasets)\s*=", text, re.M)
                                        + re.findall(r"import\s+\(?\s*(\w+_datasets)", text)))
        if not variables:
            raise OpenCompassInputError(f"--datasets: {matches[0]} defines no *_datasets list")
        module = ".".join(matches[0].relative_to(configs_dir.parents[2]).with_suffix("").parts)  # from site-packages
        found.append(DatasetConfig(name, module, variables))
    return found


def check_custom_dataset(path: str | os.PathLike) -> Path:
    """A local dataset in OpenCompass's custom QA format: JSONL records with ``question`` and ``answer``."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise OpenCompassInputError(f"--custom-dataset: no file {str(path)!r}")
    if file.suffix != ".jsonl":
        raise OpenCompassInputError(f"--custom-dataset {path}: expected a .jsonl file")
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise OpenCompassInputError(f"--custom-dataset {path}:{number}: not JSON ({error.msg})") from None
        missing = [key for key in ("question", "answer") if not isinstance(record, dict) or key not in record]
        if missing:
            raise OpenCompassInputError(f"--custom-dataset {path}:{number}: missing field(s) {', '.join(missing)}")
    return file


def link_local_data(data_root: Path, source: Path | None) -> list[str]:
    """Link the benchmark files OpenCompass reads in the same format from ``source`` (``DARE_GYM_DATA_DIR``) into
    ``data_root/data``; returns what was linked. Existing files are left alone."""
    linked = []
    if source is None or not source.is_dir():
        return linked
    for target, origin in LINKED_DATA.values():
        src, dst = source / origin, data_root / "data" / target
        if src.exists() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())
            linked.append(target)
    return linked


# --------------------------------------------------------------------------------------------- config


def config_source(*, datasets: Sequence[DatasetConfig], custom: Sequence[Path], model_name: str, base_url: str,
                  tokenizer_path: str, max_out_len: int, max_seq_len: int, batch_size: int, workers: int,
                  limit: int | None = None, abbr: str = "dare_gym") -> str:
    """The text of an OpenCompass config file. Written as literal dicts: OpenCompass reads its config with lazy
    imports, where calling an imported helper fails."""
    lines = ["# written by dare-gym opencompass", "from mmengine.config import read_base", ""]
    if datasets:
        lines.append("with read_base():")
        lines += [f"    from {d.module} import {', '.join(d.variables)}" for d in datasets]
        lines.append("")
    lines += [
        "from opencompass.models import OpenAISDK",
        "from opencompass.datasets.custom import CustomDataset",
        "from opencompass.openicl.icl_prompt_template import PromptTemplate",
        "from opencompass.openicl.icl_retriever import ZeroRetriever",
        "from opencompass.openicl.icl_inferencer import GenInferencer",
        "from opencompass.openicl.icl_evaluator import AccEvaluator",
        "from opencompass.partitioners import NaivePartitioner",
        "from opencompass.runners import LocalRunner",
        "from opencompass.tasks import OpenICLInferTask, OpenICLEvalTask",
        "",
        "datasets = []",
    ]
    for d in datasets:
        lines += [f"datasets += {v}" for v in d.variables]
    for path in custom:
        lines.append(
            f"datasets.append(dict(abbr={path.stem!r}, type=CustomDataset, path={str(path)!r}, "
            "reader_cfg=dict(input_columns=['question'], output_column='answer'), "
            "infer_cfg=dict(prompt_template=dict(type=PromptTemplate, template=dict(round=[dict(role='HUMAN', "
            "prompt='{question}')])), retriever=dict(type=ZeroRetriever), inferencer=dict(type=GenInferencer)), "
            "eval_cfg=dict(evaluator=dict(type=AccEvaluator), pred_role='BOT')))")
    if limit is not None:
        lines += ["for _dataset in datasets:", f"    _dataset['reader_cfg']['test_range'] = '[0:{int(limit)}]'"]
    lines += [
        "",
        "api_meta_template = dict(round=[dict(role='HUMAN', api_role='HUMAN'), "
        "dict(role='BOT', api_role='BOT', generate=True)])",
        f"models = [dict(type=OpenAISDK, abbr={abbr!r}, path={model_name!r}, key='EMPTY', "
        f"openai_api_base={base_url!r}, tokenizer_path={tokenizer_path!r}, meta_template=api_meta_template, "
        f"query_per_second=1000, max_workers={int(workers)}, max_out_len={int(max_out_len)}, "
        f"max_seq_len={int(max_seq_len)}, batch_size={int(batch_size)}, retry=2, temperature=None)]",
        "# one task per dataset, so that a failing dataset leaves the others their scores",
        "infer = dict(partitioner=dict(type=NaivePartitioner), runner=dict(type=LocalRunner, max_num_workers=2, "
        "task=dict(type=OpenICLInferTask)))",
        "eval = dict(partitioner=dict(type=NaivePartitioner), runner=dict(type=LocalRunner, max_num_workers=2, "
        "task=dict(type=OpenICLEvalTask)))",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- results


@dataclass
class SummaryRow:
    dataset: str
    metric: str
    mode: str
    score: float | None  # None: the task produced no score


@dataclass
class OpenCompassResult:
    """What a run produced: a row per dataset, the run's folder and its summary CSV."""

    rows: list[SummaryRow]
    run_dir: Path
    summary_csv: Path
    seconds: float = 0.0
    install_seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"rows": [vars(r) for r in self.rows], "run_dir": str(self.run_dir), "summary_csv": str(self.summary_csv),
                "seconds": self.seconds, "install_seconds": self.install_seconds, "failures": self.failures}


def read_summary(summary_csv: Path, abbr: str) -> list[SummaryRow]:
    """The rows of OpenCompass's summary CSV for model ``abbr``; ``-`` (no score) becomes None."""
    with open(summary_csv, newline="") as f:
        table = list(csv.DictReader(f))
    if table and abbr not in table[0]:
        raise OpenCompassError(f"{summary_csv}: no column for model {abbr!r} (columns: {', '.join(table[0])})")
    rows = []
    for entry in table:
        value = (entry.get(abbr) or "-").strip()
        try:
            score = float(value)
        except ValueError:
            score = None
        rows.append(SummaryRow(entry["dataset"], entry.get("metric", "-"), entry.get("mode", "-"), score))
    return rows


def failure_reason(run_dir: Path, abbr: str, dataset: str) -> str:
    """The last error line of the dataset's inference log (else its evaluation log), with the log's path."""
    for stage in ("infer", "eval"):
        log = run_dir / "logs" / stage / abbr / f"{dataset}.out"
        if not log.is_file():
            continue
        errors = [line.strip() for line in log.read_text(errors="replace").splitlines()
                  if re.match(r"^\w+(\.\w+)*(Error|Exception)\b", line.strip())]
        if errors:
            return f"{errors[-1][:300]} (log: {log})"
    return f"no score and no error in its logs (see {run_dir / 'logs'})"


def latest_run(work_dir: Path) -> Path | None:
    runs = sorted((p for p in work_dir.iterdir() if p.is_dir() and (p / "summary").is_dir()), key=lambda p: p.name)
    return runs[-1] if runs else None


def run_opencompass(venv: Venv, config: Path, work_dir: Path, *, data_root: Path, log_file: Path,
                    timeout_s: float | None = None) -> subprocess.CompletedProcess:
    """Run ``opencompass CONFIG -w WORK_DIR`` offline, its output to ``log_file``."""
    env = dict(os.environ, COMPASS_DATA_CACHE=str(data_root), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # nothing of this environment may leak into OpenCompass's
    with open(log_file, "w") as out:
        return subprocess.run([str(venv.opencompass), str(config), "-w", str(work_dir)], stdout=out,
                              stderr=subprocess.STDOUT, env=env, timeout=timeout_s, cwd=work_dir)


def evaluate_with_opencompass(policy, *, model_name: str, tokenizer_path: str, datasets: Sequence[str] = (),
                              custom_datasets: Sequence[str | os.PathLike] = (), venv: str | os.PathLike = DEFAULT_VENV,
                              work_dir: str | os.PathLike = "runs/opencompass", data_root: str | os.PathLike = DEFAULT_DATA,
                              limit: int | None = None, max_out_len: int | None = None, batch_size: int = 32,
                              timeout_s: float | None = None, log: Callable[[str], None] = print) -> OpenCompassResult:
    """Score ``policy`` with OpenCompass (see the module docstring). Raises :class:`OpenCompassFailed` naming every
    task without a score, :class:`OpenCompassError` when OpenCompass cannot run at all."""
    from dare_gym.tools.serve import ServerThread

    if not datasets and not custom_datasets:
        raise OpenCompassInputError("give --datasets or --custom-dataset")
    custom = [check_custom_dataset(p) for p in custom_datasets]
    env = ensure_venv(venv, log=log)
    configs = find_dataset_configs(site_packages(env) / "opencompass" / "configs" / "datasets", datasets)
    work = Path(work_dir).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = Path(data_root).expanduser().resolve()
    data.mkdir(parents=True, exist_ok=True)
    source = os.environ.get("DARE_GYM_DATA_DIR")
    linked = link_local_data(data, Path(source).resolve() if source else None)
    if linked:
        log(f"linked {', '.join(linked)} from DARE_GYM_DATA_DIR into {data / 'data'}")
    abbr = re.sub(r"[^\w.-]+", "_", model_name).strip("_") or "dare_gym"
    start = time.monotonic()
    with ServerThread(policy, model_name=model_name, max_batch_size=batch_size, batch_wait_ms=20) as server:
        max_seq_len = server.app.state.max_model_len or 1 << 20
        text = config_source(datasets=configs, custom=custom, model_name=model_name, base_url=server.base_url,
                             tokenizer_path=tokenizer_path, max_out_len=max_out_len or policy.generation_defaults[
                                 "gen_length"], max_seq_len=max_seq_len, batch_size=batch_size, workers=batch_size,
                             limit=limit, abbr=abbr)
        config = work / "opencompass_config.py"
        config.write_text(text)
        log(f"running OpenCompass on {', '.join([*datasets, *(p.stem for p in custom)])} against {server.base_url} "
            f"(log: {work / 'opencompass.log'})")
        before = {p.name for p in work.iterdir()}
        done = run_opencompass(env, config, work, data_root=data, log_file=work / "opencompass.log",
                               timeout_s=timeout_s)
    seconds = time.monotonic() - start
    run_dir = latest_run(work)
    if run_dir is None or run_dir.name in before:
        tail = (work / "opencompass.log").read_text(errors="replace").strip().splitlines()[-3:]
        raise OpenCompassError(f"OpenCompass wrote no summary (exit code {done.returncode}): "
                               + " | ".join(tail) + f" (log: {work / 'opencompass.log'})")
    summary_csv = sorted((run_dir / "summary").glob("summary_*.csv"))[-1]
    rows = read_summary(summary_csv, abbr)
    result = OpenCompassResult(rows, run_dir, summary_csv, seconds, env.install_seconds)
    result.failures = {f"{abbr}/{row.dataset}": failure_reason(run_dir, abbr, row.dataset)
                       for row in rows if row.score is None}
    (work / "result.json").write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    if result.failures:
        raise OpenCompassFailed(result.failures, result)
    if done.returncode != 0:
        raise OpenCompassError(f"opencompass exited with code {done.returncode} (log: {work / 'opencompass.log'})")
    return result


def tokenizer_source(policy_name: str) -> str:
    """Where OpenCompass loads the tokenizer that counts prompt tokens: the checkpoint folder (``tiny``: the
    built-in one), else the hub id."""
    from dare_gym.core.policy import TINY_CHECKPOINT

    if policy_name == "tiny":
        return str(TINY_CHECKPOINT)
    path = Path(policy_name).expanduser()
    return str(path.resolve()) if path.is_dir() else policy_name


__all__ = ["ALIASES", "DEFAULT_VENV", "OPENCOMPASS_VERSION", "DatasetConfig", "OpenCompassError", "OpenCompassFailed",
           "OpenCompassInputError", "OpenCompassResult", "SummaryRow", "Venv", "config_source", "ensure_venv", "evaluate_with_opencompass",
           "find_dataset_configs", "read_summary", "tokenizer_source"]
