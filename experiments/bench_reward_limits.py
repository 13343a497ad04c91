"""What reward time limits cost and whether they hold: hung completions, quadratic-looking inputs, overhead.

    DARE_GYM_DATA_DIR=../shared/data python experiments/bench_reward_limits.py --label after
    # writes experiments/results/reward_limits_<label>.json and prints a table

Each case runs in a fresh process (``--case NAME``) under a wall-clock cap, so a case whose reward cannot be
stopped shows as "> cap" instead of stalling the benchmark; "exit s" is how long that process took to exit
after its scoring returned (a reward thread still running keeps a process alive).

* ``sleep_hung_N``: N completions scored by a user closure that sleeps 30 s, limit 1 s.
* ``gil_hung_N``: N completions scored by a user closure that holds the GIL for ~30 s (a catastrophic regex
  in C), limit 1 s.
* ``gsm8k_answer_K``: one completion of K bytes of repeated ``<answer>``, GSM8K's ``math_verify``, limit 2 s
  (after one normal completion, whose time, helper start-up included, is ``first_call_s``).
* ``overhead_*``: rewards per second on the 1319 GSM8K gold solutions (batches of 64, as a vector env scores
  them) with no limit (in-process) and with the default 60 s limit (the killable path); the same for a user
  lambda (forked helpers), for it in a process that holds torch and the tiny dLLM (what a fork costs in a
  trainer), and for the ``format`` reward (linear-time: in-process under the limit too).
* ``linear_rates``: the slowest rate of each ``linear_time`` reward over pathological 1 MiB texts, scored
  in-process: ``LINEAR_CHARS_PER_S`` (the rate those rewards are trusted to beat) must stay well below it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
HANG_CASES = {"sleep_hung_8": ("sleep", 8), "sleep_hung_64": ("sleep", 64),
              "gil_hung_8": ("gil", 8), "gil_hung_64": ("gil", 64)}
ANSWER_CASES = {"gsm8k_answer_128k": 128 * 1024, "gsm8k_answer_256k": 256 * 1024, "gsm8k_answer_1m": 1024 * 1024}
OVERHEAD_CASES = ("overhead_math_verify", "overhead_user_lambda", "overhead_user_lambda_torch", "overhead_format")
BATCH = 64


def _timed_scoring(reward, completions, samples) -> dict:
    start = time.perf_counter()
    results = reward.score_many(completions, samples)
    seconds = time.perf_counter() - start
    errors = sorted({e for r in results for e in r.errors.values()})
    return {"seconds": seconds, "count": len(results), "zero_scores": sum(r.total == 0 for r in results),
            "errors": errors[:3]}


def run_hang_case(kind: str, count: int) -> dict:
    from dare_gym.rewards import resolve_reward

    catastrophic = re.compile(r"(a+)+$")

    def hangs(completion, sample):
        if kind == "sleep":
            time.sleep(30)
        else:  # backtracking inside one C call: the GIL is held the whole time
            catastrophic.match("a" * 29 + "b")
        return 1.0

    reward = resolve_reward(hangs, timeout_s=1.0)
    return _timed_scoring(reward, [f"completion {i}" for i in range(count)], [{}] * count)


def run_answer_case(size: int) -> dict:
    from dare_gym.rewards import resolve_reward

    reward = resolve_reward("math_verify", timeout_s=2.0)
    start = time.perf_counter()
    reward.score_many(["#### 18"], [{"gold": "18"}])  # a normal completion first: helpers started, sympy imported
    warm_up = time.perf_counter() - start
    row = _timed_scoring(reward, ["<answer>" * (size // len("<answer>"))], [{"gold": "18"}])
    return {**row, "first_call_s": warm_up}


def _gsm8k_golds() -> tuple[list[str], list[dict]]:
    import dare_gym

    env = dare_gym.make("gsm8k-v0", split="test")
    records = [env.record(i) for i in range(env.num_records)]
    return [r["answer"] for r in records], records


def _rate(reward, completions, samples) -> tuple[float, int]:
    reward.score_many(completions[:BATCH], samples[:BATCH])  # warm up: helpers started, math-verify imported
    start = time.perf_counter()
    correct = 0
    for i in range(0, len(completions), BATCH):
        results = reward.score_many(completions[i:i + BATCH], samples[i:i + BATCH])
        correct += sum(r.total >= 1.0 for r in results)
    return len(completions) / (time.perf_counter() - start), correct


def run_overhead_case(name: str) -> dict:
    from dare_gym.rewards import resolve_reward

    completions, samples = _gsm8k_golds()
    if name == "overhead_user_lambda_torch":  # a trainer's process: torch, its threads, a model in memory
        import torch

        import dare_gym

        policy = dare_gym.load_policy("tiny")
        policy.generate(["1 + 1 ="], gen_length=8, steps=4, block_length=8, temperature=0.0)
        torch.ones(512, 512) @ torch.ones(512, 512)  # start the intra-op thread pool
    spec = {"overhead_math_verify": "math_verify", "overhead_format": "format",
            "overhead_user_lambda": lambda c, s: float(s["gold"] in c),
            "overhead_user_lambda_torch": lambda c, s: float(s["gold"] in c)}[name]
    row = {}
    for label, limit in (("in_process", None), ("limited_60s", 60.0)):
        per_s, correct = _rate(resolve_reward(spec, timeout_s=limit), completions, samples)
        row[f"{label}_per_s"], row[f"{label}_full_scores"] = per_s, correct
    row["records"] = len(completions)
    return row


def pathological_texts(size: int = 1 << 20) -> dict[str, str]:
    """Texts built to slow down extractors: repeated openers, nesting, long runs, unicode."""
    return {
        "answer openers": "<answer>" * (size // 8), "closed blocks": "<answer>1</answer>" * (size // 18),
        "boxed openers": "\\boxed{" * (size // 7), "deep braces": "{" * (size // 2) + "}" * (size // 2),
        "alternating braces": "\\boxed{" + "{}" * (size // 2), "nines": "9" * size, "spaces": " " * size,
        "reasoning tags": "<reasoning>" + "</reasoning> <answer>" * (size // 21),
        "bare reasoning closers": "<reasoning>" + "</reasoning>" * (size // 12) + "<answer>x</answer>",
        "numbers": "1 " * (size // 2), "unicode": "é漢😀\u0301" * (size // 4),
    }


def run_linear_rates() -> dict:
    from dare_gym.rewards import get_reward, list_rewards

    samples = {"exact_match": {"gold": "012345"}, "char_match": {"gold": "0123456789" * 100},
               "countdown": {"numbers": [1, 2, 3], "target": 6},
               "sudoku": {"puzzle": "3102200002100320", "solution": "3142243142131324"}}
    texts = pathological_texts()
    rates = {}
    for name in list_rewards():
        fn = get_reward(name)
        if not fn.linear_time:
            continue
        worst_s, worst_text = 0.0, ""
        for label, text in texts.items():
            start = time.perf_counter()
            fn(text, samples.get(name, {}))
            seconds = time.perf_counter() - start
            if seconds > worst_s:
                worst_s, worst_text = seconds, label
        rates[name] = {"worst_chars_per_s": len(texts[worst_text]) / worst_s, "worst_text": worst_text}
    return {"rates": rates}


def run_case(name: str) -> dict:
    if name == "linear_rates":
        return run_linear_rates()
    if name in HANG_CASES:
        return run_hang_case(*HANG_CASES[name])
    if name in ANSWER_CASES:
        return run_answer_case(ANSWER_CASES[name])
    return run_overhead_case(name)


def measure(name: str, cap_s: float) -> dict:
    """Run one case in a fresh process; its scoring time, and how long the process took to exit after it."""
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True, text=True,
                              timeout=cap_s, check=False)
    except subprocess.TimeoutExpired:
        return {"case": name, "capped_at_s": cap_s}
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"case": name, "failed": done.stderr[-2000:]}
    row = json.loads(lines[-1])
    row["case"] = name
    row["exit_s"] = max(0.0, wall - row.pop("finished_after_s"))
    return row


def _cell(row: dict, key: str, fmt: str = "{:.2f}") -> str:
    if "capped_at_s" in row:
        return f"> {row['capped_at_s']:.0f}"
    return fmt.format(row[key]) if key in row else "—"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="after", help="names the output file (e.g. before / after)")
    parser.add_argument("--cap", type=float, default=150.0, help="seconds before a case is stopped")
    parser.add_argument("--only", nargs="*", help="run only these cases")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args()
    if args.case:
        started = time.perf_counter()
        row = run_case(args.case)
        row["finished_after_s"] = time.perf_counter() - started
        print(json.dumps(row), flush=True)
        return

    names = args.only or [*HANG_CASES, *ANSWER_CASES, *OVERHEAD_CASES, "linear_rates"]
    if not os.environ.get("DARE_GYM_DATA_DIR"):
        names = [n for n in names if n not in OVERHEAD_CASES]
        print("DARE_GYM_DATA_DIR is not set: skipping the GSM8K overhead cases")
    rows = []
    for name in names:
        rows.append(measure(name, args.cap))
        print(f"  {name}: {rows[-1]}", flush=True)
    print(f"\n| case ({args.label}) | scoring s | exit s | zero scores | first error |\n|---|---|---|---|---|")
    # (gsm8k_answer_* rows: the pathological completion only; first_call_s in the JSON is the cold start)
    for row in rows:
        if row["case"] in OVERHEAD_CASES or row["case"] == "linear_rates":
            continue
        error = (row.get("errors") or ["—"])[0]
        print(f"| {row['case']} | {_cell(row, 'seconds')} | {_cell(row, 'exit_s')} | "
              f"{_cell(row, 'zero_scores', '{}')}/{row.get('count', '?')} | {error} |")
    overhead = [r for r in rows if r["case"] in OVERHEAD_CASES]
    if overhead:
        print("\n| GSM8K golds, batches of 64 | in-process rewards/s | 60 s limit rewards/s | full scores (in / limited) |")
        print("|---|---|---|---|")
        for row in overhead:
            print(f"| {row['case'].removeprefix('overhead_')} | {_cell(row, 'in_process_per_s', '{:,.0f}')} | "
                  f"{_cell(row, 'limited_60s_per_s', '{:,.0f}')} | "
                  f"{row.get('in_process_full_scores', '?')} / {row.get('limited_60s_full_scores', '?')} |")
    for row in rows:
        if row["case"] == "linear_rates" and "rates" in row:
            print("\n| linear_time reward | slowest rate, M chars/s (in-process) | on |\n|---|---|---|")
            for name, rate in row["rates"].items():
                print(f"| {name} | {rate['worst_chars_per_s'] / 1e6:,.1f} | {rate['worst_text']} |")
    output = RESULTS / f"reward_limits_{args.label}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"label": args.label, "cpu_count": os.cpu_count(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
