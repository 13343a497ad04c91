"""What the verdict outside the program's interpreter costs: this sandbox against the previous design (the test
harness inside the program's interpreter, commit 6d1e42d), measured in one run on the same machine.

    DARE_GYM_DATA_DIR=../shared/data python experiments/bench_sandbox.py    # writes experiments/results/sandbox.json

For each design, in alternation: HumanEval's 164 canonical solutions with 1 and 2 workers (all must pass), the
164 bare prompts (all must fail), MBPP's 500 test-split reference solutions with 2 workers (all must pass);
wall seconds and the CPU seconds of all the sandbox's processes (programs, checkers and the checker server).
This design is measured twice: checkers forked by the checker server (the default) and checkers in fresh
interpreters (its fallback where pidfds are unavailable). Then the code extraction of both designs on
completions made of one repeated pattern (the previous one was quadratic in repeated fences). The previous
design runs from a temporary ``git worktree`` of ``--old-rev`` in a subprocess (this same script with
``--side old``), so both use this interpreter and these packages.

    DARE_GYM_DATA_DIR=../shared/data python experiments/bench_sandbox.py --startup    # writes sandbox_startup.json

measures what the deny-by-default isolation costs each run (an allow-listed root pivoted into, a seccomp
filter, new cgroups made and removed per run) against ``--startup-rev`` (8f3a149: the host's tree remounted
read-only, reused cgroups, no filter), in alternation: a trivial program run 200 times with 1 and with 2
workers, and HumanEval's 164 canonical solutions with 2 workers; this design also without its seccomp filter.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
OLD_REV = "6d1e42d"
STARTUP_REV = "8f3a149"  # the last commit before the allow-listed root, the seccomp filter and fresh cgroups
STARTUP_RUNS = 200
PATTERNS = {"openers": "```", "fences on lines": "```\n", "labelled openers": "```python", "mixed": "```py\n`` `"}
OLD_SIZES_KIB = (16, 32, 64, 128)  # the old extraction needs ~15 s at 128 KiB and grows with the square
NEW_SIZES_KIB = (16, 32, 64, 128, 1024)


def data_dir() -> Path:
    folder = os.environ.get("DARE_GYM_DATA_DIR")
    if not folder or not Path(folder).is_dir():
        sys.exit("set DARE_GYM_DATA_DIR to the benchmark data folder (../shared/data)")
    return Path(folder)


def humaneval_records() -> list[dict]:
    with gzip.open(data_dir() / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def mbpp_records() -> list[dict]:
    with open(data_dir() / "mbpp" / "mbpp.jsonl") as f:
        return [r for r in map(json.loads, filter(str.strip, f)) if 11 <= int(r["task_id"]) <= 510]


def sandbox_cpu_s() -> float:
    """CPU seconds of this process's finished children and their descendants, and of the checker server's
    tree (its forks are its children, not ours)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = usage.ru_utime + usage.ru_stime
    server = getattr(getattr(sys.modules.get("dare_gym.rewards.sandbox"), "_CHECKER_SERVER", None), "_proc", None)
    if server is not None and server.poll() is None:
        fields = Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime
    return total


# ------------------------------------------------------------------------------------------------ one side


def design(fresh_checkers: bool):
    """``(name, build_humaneval, build_mbpp, run_many)`` of the code on ``sys.path``: this design judges with a
    checker (``*_check`` + ``check_programs``), the previous one ran program and tests together."""
    code = importlib.import_module("dare_gym.rewards.code")
    sandbox = importlib.import_module("dare_gym.rewards.sandbox")
    if not hasattr(code, "humaneval_check"):
        return "previous: tests in the program", code.humaneval_program, code.mbpp_program, sandbox.run_programs
    if fresh_checkers:
        sandbox._CHECKER_SERVER.unavailable = "measuring the fallback"
        return "this: fresh checker process", code.humaneval_check, code.mbpp_check, sandbox.check_programs
    return "this: checker forked by the server", code.humaneval_check, code.mbpp_check, sandbox.check_programs


def time_runs(label: str, jobs: list, workers: int, expect_pass: bool, run_many, limits) -> dict:
    cpu, start = sandbox_cpu_s(), time.perf_counter()
    results = run_many(jobs, limits, workers=workers)
    seconds, cpu = time.perf_counter() - start, sandbox_cpu_s() - cpu
    wrong = [i for i, r in enumerate(results) if r.passed != expect_pass]
    return {"case": label, "workers": workers, "programs": len(jobs), "passed": sum(r.passed for r in results),
            "as_expected": not wrong, "unexpected": [(i, results[i].status, results[i].reason[:200]) for i in wrong],
            "seconds": seconds, "cpu_s": cpu, "ms_per_program": 1000 * seconds / len(jobs)}


def time_extraction(extract, sizes_kib) -> list[dict]:
    rows = []
    for name, unit in PATTERNS.items():
        for kib in sizes_kib:
            text = unit * (kib * 1024 // len(unit))
            start = time.perf_counter()
            extract(text)
            rows.append({"pattern": name, "kib": kib, "seconds": time.perf_counter() - start})
    return rows


def measure(which: str, sizes_kib, fresh_checkers: bool) -> dict:
    """Everything for the design on ``sys.path``; ``which`` is ``humaneval`` (1 and 2 workers, bare prompts),
    ``mbpp`` or ``extraction``."""
    name, build_humaneval, build_mbpp, run_many = design(fresh_checkers)
    limits = importlib.import_module("dare_gym.rewards.sandbox").SandboxLimits(timeout_s=30.0)
    run_many([build_humaneval(humaneval_records()[0], "")], limits, workers=1)  # probe the isolation once
    if which == "extraction":
        return {"design": name, "rows": time_extraction(importlib.import_module("dare_gym.rewards.code").extract_code,
                                                        sizes_kib)}
    if which == "mbpp":
        records = mbpp_records()
        jobs = [build_mbpp(r, r["code"]) for r in records]
        return {"design": name, "rows": [time_runs("MBPP references", jobs, 2, True, run_many, limits)]}
    records = humaneval_records()
    canonical = [build_humaneval(r, r["canonical_solution"]) for r in records]
    rows = [time_runs("HumanEval canonical", canonical, workers, True, run_many, limits) for workers in (1, 2)]
    bare = [build_humaneval(r, "") for r in records]
    rows.append(time_runs("HumanEval bare prompts", bare, 2, False, run_many, limits))
    return {"design": name, "rows": rows}


# ------------------------------------------------------------------------------------------------ both sides


def measure_startup(variant: str) -> dict:
    """Start-up cost per run of the design on ``sys.path``: a trivial program ``STARTUP_RUNS`` times with 1 and 2
    workers, and HumanEval's canonical solutions with 2; ``variant`` ``no-filter`` turns the seccomp filter off."""
    sandbox = importlib.import_module("dare_gym.rewards.sandbox")
    code = importlib.import_module("dare_gym.rewards.code")
    limits = sandbox.SandboxLimits(timeout_s=30.0)
    sandbox.run_program("pass\n", limits)  # probe the isolation once, outside the timings
    if variant == "no-filter":
        sandbox._get_plan().seccomp = None
    report = sandbox.isolation_report()
    rows = [time_runs("trivial program", ["pass\n"] * STARTUP_RUNS, workers, True, sandbox.run_programs, limits)
            for workers in (1, 2)]
    records = humaneval_records()
    canonical = [code.humaneval_check(r, r["canonical_solution"]) for r in records]
    rows.append(time_runs("HumanEval canonical", canonical, 2, True, sandbox.check_programs, limits))
    layers = {key: report.get(key) for key in ("allow_listed_root", "syscall_filter", "fresh_cgroups", "mount_namespace",
                                               "memory_cgroup", "unprivileged_uid")}
    return {"design": variant, "layers": layers, "rows": rows}


def run_side(tree: Path, which: str, sizes_kib=(), fresh_checkers: bool = False, variant: str = "") -> dict:
    """This script in a fresh interpreter with ``tree`` first on ``sys.path``."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    command = [sys.executable, str(Path(__file__).resolve()), "--side", which,
               "--sizes", ",".join(map(str, sizes_kib))] + (["--fresh-checkers"] if fresh_checkers else [])
    command += ["--variant", variant] if variant else []
    output = subprocess.run(command, env=env, cwd=tree, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def old_worktree(rev: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="dare_gym_old_sandbox_"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), rev], check=True,
                   capture_output=True)
    return folder


def print_tables(runs: list[dict], extraction: list[dict]) -> None:
    print("| design | case | workers | passed | as expected | seconds | sandbox CPU s | ms/program |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        for row in run["rows"]:
            print(f"| {run['design']} | {row['case']} | {row['workers']} | {row['passed']}/{row['programs']} | "
                  f"{'yes' if row['as_expected'] else 'NO'} | {row['seconds']:.1f} | {row['cpu_s']:.1f} | "
                  f"{row['ms_per_program']:.0f} |")
    print("\n| design | pattern | KiB | extraction seconds |\n|---|---|---|---|")
    for run in extraction:
        for row in run["rows"]:
            print(f"| {run['design']} | {row['pattern']} | {row['kib']} | {row['seconds']:.4f} |")


def startup(args) -> None:
    """Before (``--startup-rev``) against after, alternated three times so that a busy spell hits both."""
    old = old_worktree(args.startup_rev)
    load_before = os.getloadavg()
    runs = []
    try:
        for _ in range(3):
            runs.append(run_side(old, "startup", variant=f"before ({args.startup_rev})"))
            runs.append(run_side(ROOT, "startup", variant="now"))
            runs.append(run_side(ROOT, "startup", variant="no-filter"))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
    print("| design | case | workers | passed | seconds | sandbox CPU s | ms/program |\n|---|---|---|---|---|---|---|")
    for run in runs:
        for row in run["rows"]:
            print(f"| {run['design']} | {row['case']} | {row['workers']} | {row['passed']}/{row['programs']} | "
                  f"{row['seconds']:.2f} | {row['cpu_s']:.2f} | {row['ms_per_program']:.1f} |")
    medians = {}
    for run in runs:
        for row in run["rows"]:
            medians.setdefault((run["design"], row["case"], row["workers"]), []).append(row["ms_per_program"])
    print("\nmedian of 3, ms per program:")
    for (design, case, workers), values in sorted(medians.items()):
        print(f"  {design:20s} {case:20s} {workers} worker(s): {sorted(values)[1]:.1f}")
    report = {"startup_rev": args.startup_rev, "cpus": os.cpu_count(), "load_before": load_before,
              "load_after": os.getloadavg(), "runs": runs,
              "median_ms_per_program": {" | ".join(map(str, key)): sorted(values)[1] for key, values in medians.items()}}
    output = RESULTS / "sandbox_startup.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nload average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"wrote {output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-rev", default=OLD_REV, help="the commit of the previous design")
    parser.add_argument("--output", type=Path, default=RESULTS / "sandbox.json")
    parser.add_argument("--startup", action="store_true", help="measure the start-up cost of the isolation instead")
    parser.add_argument("--startup-rev", default=STARTUP_REV, help="the commit to compare the start-up cost with")
    parser.add_argument("--side", choices=("humaneval", "mbpp", "extraction", "startup"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="", help=argparse.SUPPRESS)
    parser.add_argument("--fresh-checkers", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "startup":
        print(json.dumps(measure_startup(args.variant)))
        return
    if args.side:  # one measurement of the design on sys.path, as one JSON line
        print(json.dumps(measure(args.side, [int(s) for s in args.sizes.split(",") if s], args.fresh_checkers)))
        return
    data_dir()
    if args.startup:
        startup(args)
        return
    old = old_worktree(args.old_rev)
    load_before = os.getloadavg()
    try:
        runs = []
        for which in ("humaneval", "mbpp"):  # alternate the designs, so that a busy spell hits all
            runs.append(run_side(old, which))
            runs.append(run_side(ROOT, which))
            runs.append(run_side(ROOT, which, fresh_checkers=True))
        extraction = [run_side(old, "extraction", OLD_SIZES_KIB), run_side(ROOT, "extraction", NEW_SIZES_KIB)]
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
    print_tables(runs, extraction)
    report = {"old_rev": args.old_rev, "cpus": os.cpu_count(), "load_before": load_before,
              "load_after": os.getloadavg(), "runs": runs, "extraction": extraction}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nload average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"wrote {args.output}")


if __name__ == "__main__":
    main()
