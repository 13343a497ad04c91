"""Training on several processes (torchrun, gloo on this CPU): the update of 2 ranks equals one process's update
on the union batch, for DDP and FSDP2, also as two launches acting as two nodes; a 2-process run resumes with 1 process; a failing rank stops every rank.
(NCCL on GPUs is the same code; the lent GPU machines have one GPU, see BENCHMARKS.md.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import update  # noqa: E402

WORKER = Path(__file__).parent / "distributed_worker.py"
CASES = ["d1:ddp", "bgpo:ddp", "dpo:ddp", "ebpo:ddp", "dtreerpo:ddp", "d1:fsdp"]


def torchrun(*arguments, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *map(str, arguments)], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def two_process_updates(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    done = torchrun(WORKER, "update", folder, *CASES)
    assert done.returncode == 0, done.stderr[-4000:]
    return folder


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_update_like_one_process_on_the_union_batch(two_process_updates, tmp_path, case):
    algorithm, strategy = case.split(":")
    two = torch.load(two_process_updates / f"{algorithm}-{strategy}.pt")
    one = update(algorithm, "ddp", str(tmp_path / "one"))  # one process: the whole union batch
    import dare_gym

    base = dare_gym.load_policy("tiny").model.state_dict()
    moved = max(float((one[k] - base[k]).abs().max()) for k in one)
    assert moved > 1e-4  # the update did something
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5


def test_two_launches_as_two_nodes_on_loopback_update_like_one_process(tmp_path):
    """Multi-node as the README documents it: two torchrun launches (``--nnodes 2 --node-rank 0/1``, one process
    each) meeting at a c10d rendezvous on loopback make the same d1 update as one process on the union batch."""
    from dare_gym.tools.serve import bind_socket

    with bind_socket("127.0.0.1", 0) as sock:
        port = sock.getsockname()[1]
    (tmp_path / "two").mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
                               "1", "--node-rank", str(rank), "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
                               str(WORKER), "update", str(tmp_path / "two"), "d1:ddp"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in (0, 1)]
    for node in nodes:
        _, stderr = node.communicate(timeout=600)
        assert node.returncode == 0, stderr[-4000:]
    two = torch.load(tmp_path / "two" / "d1-ddp.pt")
    one = update("d1", "ddp", str(tmp_path / "one"))
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5


def test_a_two_process_fsdp_run_resumes_with_one_process(tmp_path):
    run = tmp_path / "run"
    settings = ["prompts_per_step=4", "group_size=4", "eval_size=8", "eval_every=1", "save_every=1",
                "time_limit_minutes=null", "progress=false", f"output_dir={run}",
                "rollout={gen_length: 8, steps: 8, block_length: 8, temperature: 1.0}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run([sys.executable, "-m", "dare_gym", "train", "--nproc", "2", "strategy=fsdp",
                            "max_steps=2", *settings], capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "on 2 processes (fsdp)" in first.stdout
    assert json.loads((run / "summary.json").read_text())["processes"] == 2
    second = subprocess.run([sys.executable, "-m", "dare_gym", "train", "--resume", f"output_dir={run}",
                             "max_steps=4"], capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resuming with 1 process(es)" in second.stderr  # the random streams are reseeded, and it says so
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert all("heldout_accuracy" in r for r in records)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["processes"] == 1


@pytest.mark.parametrize("how, message", [("report", "rank 1: loss nan at step 3"),
                                          ("raise", "rank 1 broke on purpose")])
def test_a_failing_rank_stops_every_rank_with_its_message(tmp_path, how, message):
    done = torchrun(WORKER, "fail", tmp_path, how, timeout=300)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert message in output
    if how == "report":  # both ranks raise the same message: neither waits for the other
        assert output.count(message) >= 2


def test_an_algorithm_that_cannot_be_distributed_is_refused_with_its_reason():
    """PPO declares why it cannot run on several processes; the configuration is refused with that reason before
    anything is launched (the command line checks it before starting torchrun), as are uneven shares."""
    from dare_gym.algorithms import get_algorithm
    from dare_gym.core.config import ConfigError
    from dare_gym.train.config import TrainConfig, resolve

    with pytest.raises(ConfigError, match="ppo: its value model has an optimizer of its own .*one process"):
        resolve(TrainConfig(algorithm={"name": "ppo"}), processes=2)
    with pytest.raises(ConfigError, match="prompts_per_step=8 must be divisible by the number of processes \\(3\\)"):
        resolve(TrainConfig(prompts_per_step=8), processes=3)
    resolve(TrainConfig(algorithm={"name": "ppo"}))  # one process: fine
    assert all(get_algorithm(name).algorithm_class.distributed_unsupported is None for name in ("d1", "bgpo", "dpo", "ebpo", "dtreerpo"))
