"""dare_gym envs stepped by tianshou's vector envs: the rewards of a batch computed in parallel worker processes.

Each sub-env of a tianshou ``SubprocVectorEnv`` lives in its own process, so ``step(completions)`` scores the
completions at the same time, one per worker. That is what code tasks want: a HumanEval or MBPP reward runs the
program against its tests in a sandbox, seconds per completion. (Inside dare_gym, ``make_vec`` and the trainer
already batch a code reward's programs in parallel; tianshou users get the same through their own vector envs.)

The example resets worker ``i`` to record ``i`` of the split and steps every worker with a completion from a
"policy" -- here the record's reference solution for even workers and an empty function body for odd ones, so the
expected rewards are known -- then prints what each worker scored and how long the parallel step took against the
same completions scored one after another in this process::

    DARE_GYM_DATA_DIR=../shared/data python experiments/tianshou_example.py --env humaneval-v0 --workers 4
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import numpy as np

import dare_gym

WRONG_COMPLETION = "    pass\n"


def make_vector_env(env_id: str, num_envs: int, *, subprocess: bool = True, **env_kwargs):
    """A tianshou vector env of ``num_envs`` copies of a dare_gym env (``SubprocVectorEnv``: one process each;
    ``DummyVectorEnv``: all in this process)."""
    from tianshou.env import DummyVectorEnv, SubprocVectorEnv

    factories = [partial(dare_gym.make, env_id, **env_kwargs) for _ in range(num_envs)]
    return SubprocVectorEnv(factories) if subprocess else DummyVectorEnv(factories)


def reset_to_records(venv, indices) -> tuple[np.ndarray, list[dict]]:
    """Reset worker ``i`` to record ``indices[i]`` (tianshou passes the same options to every worker it resets,
    so each worker is reset on its own)."""
    prompts, infos = [], []
    for worker, index in enumerate(indices):
        obs, info = venv.reset(env_id=[worker], options={"index": int(index)})
        prompts.append(obs[0])
        infos.append(info[0])
    return np.array(prompts, dtype=object), infos


def oracle_policy(env, indices) -> list[str]:
    """The reference solution for even workers, a wrong body for odd ones."""
    return [env.demonstration(env.record(int(i))) if n % 2 == 0 else WRONG_COMPLETION for n, i in enumerate(indices)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="humaneval-v0")
    parser.add_argument("--split", default="test")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)

    local = dare_gym.make(args.env, split=args.split)
    indices = list(range(args.workers))
    completions = oracle_policy(local, indices)

    venv = make_vector_env(args.env, args.workers, split=args.split)
    try:
        prompts, infos = reset_to_records(venv, indices)
        start = time.perf_counter()
        _, rewards, terminated, truncated, step_infos = venv.step(np.array(completions, dtype=object))
        parallel_s = time.perf_counter() - start
    finally:
        venv.close()

    start = time.perf_counter()  # the same completions scored one after another, in this process
    sequential = []
    for index, completion in zip(indices, completions):
        local.reset(options={"index": index})
        sequential.append(local.step(completion)[1])
    sequential_s = time.perf_counter() - start

    result = {
        "env": args.env, "workers": args.workers, "indices": indices,
        "rewards": [float(r) for r in rewards], "correct": [bool(i["correct"]) for i in step_infos],
        "terminated": [bool(t) for t in terminated], "sequential_rewards": [float(r) for r in sequential],
        "parallel_step_s": round(parallel_s, 3), "sequential_s": round(sequential_s, 3),
    }
    for worker, (index, reward) in enumerate(zip(indices, result["rewards"])):
        label = infos[worker].get("task_id", index)
        print(f"worker {worker}: record {label}: reward {reward:.1f} ({'reference' if worker % 2 == 0 else 'wrong'})")
    print(f"parallel step over {args.workers} workers: {parallel_s:.2f} s; one after another: {sequential_s:.2f} s")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
