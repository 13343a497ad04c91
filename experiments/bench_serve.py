"""Latency and throughput of ``dare-gym serve`` on the tiny policy, with and without request batching.

A closed loop: ``--clients`` threads each send ``--requests`` completion requests one after another (digit-sorting
prompts) to a server on loopback, for each server setting:

* ``no batching``: ``max_batch_size=1`` (one sampler call per request);
* ``batching``: ``max_batch_size=32``, ``batch_wait_ms=5`` (the defaults of ``dare-gym serve``).

It prints a table (requests/s, median and p90 latency, rows per sampler call) and writes JSON::

    python experiments/bench_serve.py --output experiments/results/serve.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import httpx
import torch

import dare_gym
from dare_gym.tools.serve import ServerThread

SETTINGS = {"no batching": dict(max_batch_size=1, batch_wait_ms=0.0),
            "batching": dict(max_batch_size=32, batch_wait_ms=5.0)}


def run_load(base_url: str, prompts: list[str], clients: int, requests: int) -> dict:
    """``clients`` threads, each sending ``requests`` requests in turn; latencies and wall time."""
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[str] = []

    def client(worker: int) -> None:
        with httpx.Client(base_url=base_url, timeout=300) as http:
            for i in range(requests):
                prompt = prompts[(worker * requests + i) % len(prompts)]
                start = time.perf_counter()
                response = http.post("/completions", json={"model": "tiny", "prompt": prompt})
                elapsed = time.perf_counter() - start
                with lock:
                    (latencies.append(elapsed) if response.status_code == 200
                     else errors.append(response.text[:200]))

    threads = [threading.Thread(target=client, args=(w,)) for w in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    ordered = sorted(latencies)
    return {"requests": len(latencies), "wall_s": wall, "requests_per_s": len(latencies) / wall,
            "latency_median_ms": 1000 * statistics.median(ordered),
            "latency_p90_ms": 1000 * ordered[int(0.9 * (len(ordered) - 1))]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=16, help="requests per client")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    policy = dare_gym.load_policy("tiny")
    env = dare_gym.make("digitsort-v0", split="test")
    prompts = [env.reset(options={"index": i})[0] for i in range(64)]
    rows = []
    for name, setting in SETTINGS.items():
        for clients in args.clients:
            with ServerThread(policy, model_name="tiny", **setting) as server:
                run_load(server.base_url, prompts, 1, 2)  # warm-up
                calls_before = list(server.batcher.stats.calls)
                load = run_load(server.base_url, prompts, clients, args.requests)
                calls = server.batcher.stats.calls[len(calls_before):]
            load.update(setting=name, clients=clients, sampler_calls=len(calls),
                        rows_per_call=sum(calls) / max(1, len(calls)))
            rows.append(load)
    print(f"tiny policy (gen_length 8, 8 steps), torch threads {args.threads}, {args.requests} requests per client\n")
    print("| server | clients | requests/s | median latency ms | p90 latency ms | rows per sampler call |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['clients']} | {r['requests_per_s']:.1f} | {r['latency_median_ms']:.0f} | "
              f"{r['latency_p90_ms']:.0f} | {r['rows_per_call']:.1f} |")
    result = {"threads": args.threads, "requests_per_client": args.requests, "rows": rows}
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
