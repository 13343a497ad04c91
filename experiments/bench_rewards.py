"""Reward throughput: math verifications per second on the GSM8K and MATH-500 golds, and sandboxed executions
per second on HumanEval's 164 canonical solutions with 1 and 2 workers (the sandbox against its previous design:
experiments/bench_sandbox.py).

    DARE_GYM_DATA_DIR=../shared/data python experiments/bench_rewards.py    # writes experiments/results/rewards.json

Math is measured twice: the reward as training calls it (a completion stating the gold answer; identical
strings short-cut) and math-verify itself on every pair (the short-cut disabled), from 2 threads, which the
helper-process pool serves with one process per core.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dare_gym
from dare_gym.rewards.math import answers_match, math_verify_reward
from dare_gym.rewards.sandbox import SandboxLimits, check_programs, isolation_report
from dare_gym.rewards.code import humaneval_check

RESULTS = Path(__file__).parent / "results"


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def bench_math(env_id: str, completion_of, threads: int) -> dict:
    env = dare_gym.make(env_id, split="test")
    records = [env.record(i) for i in range(env.num_records)]
    answers_match.cache_clear()
    start = time.perf_counter()
    scores = [math_verify_reward(completion_of(r), r) for r in records]
    reward_seconds = time.perf_counter() - start
    answers_match.cache_clear()
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        verified = list(pool.map(lambda r: answers_match(r["gold"], r["gold"], shortcut=False), records))
    verify_seconds = time.perf_counter() - start
    return {
        "env": env_id, "records": len(records), "reward_correct": sum(s == 1.0 for s in scores),
        "reward_per_s": rate(len(records), reward_seconds), "math_verify_correct": sum(verified),
        "math_verify_per_s": rate(len(records), verify_seconds), "threads": threads,
    }


def bench_humaneval(workers: int) -> dict:
    env = dare_gym.make("humaneval-v0")
    records = [env.record(i) for i in range(env.num_records)]
    programs = [humaneval_check(r, r["canonical_solution"]) for r in records]
    start = time.perf_counter()
    results = check_programs(programs, SandboxLimits(timeout_s=10.0), workers=workers)
    seconds = time.perf_counter() - start
    return {"workers": workers, "programs": len(programs), "passed": sum(r.passed for r in results),
            "seconds": seconds, "executions_per_s": rate(len(programs), seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=RESULTS / "rewards.json")
    args = parser.parse_args()
    with ThreadPoolExecutor(max_workers=2) as pool:  # start both helper processes before timing
        list(pool.map(lambda i: answers_match(str(i), f"{i}.0", shortcut=False), range(8)))
    math_rows = [
        bench_math("gsm8k-v0", lambda r: r["answer"], threads=2),
        bench_math("math500-v0", lambda r: f"so the answer is $\\boxed{{{r['gold']}}}$", threads=2),
    ]
    print("| golds | records | reward judged correct | reward calls/s | math-verify correct | math-verify/s (2 threads) |")
    print("|---|---|---|---|---|---|")
    for row in math_rows:
        print(f"| {row['env']} | {row['records']} | {row['reward_correct']} | {row['reward_per_s']:,.0f} | "
              f"{row['math_verify_correct']} | {row['math_verify_per_s']:,.0f} |")
    code_rows = [bench_humaneval(1), bench_humaneval(2)]
    print("\n| HumanEval canonical | passed | seconds | executions/s |\n|---|---|---|---|")
    for row in code_rows:
        print(f"| {row['workers']} worker(s) | {row['passed']}/{row['programs']} | {row['seconds']:.1f} | "
              f"{row['executions_per_s']:.1f} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"math": math_rows, "humaneval": code_rows,
                                       "isolation": isolation_report()}, indent=1, default=str) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
