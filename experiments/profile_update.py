"""Where one default training step's update spends its time: cProfile over the update phase only.

    python experiments/profile_update.py [--steps 3] [overrides ...]   # prints the top functions by own time

Runs `dare-gym train`'s default config like ``bench_train.py`` (rollouts collected as usual, not profiled),
then profiles ``Trainer.update`` — π_old / π_ref scoring, the loss and the optimizer steps — over ``--steps``
steps after one warm-up step, with torch's threads set by ``--threads`` (1: stable under other load).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time

import torch

from dare_gym.core.config import load_config
from dare_gym.tools.cli import default_config_path
from dare_gym.train.trainer import Trainer, TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, as for dare-gym train")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        config = load_config(TrainConfig, default_config_path(), [f"output_dir={workdir}", *args.overrides])
        trainer = Trainer(config)
        buffer, _ = trainer.collect()
        trainer.update(buffer)  # warm-up
        profiler, cpu = cProfile.Profile(timer=time.process_time), 0.0
        for _ in range(args.steps):
            buffer, _ = trainer.collect()
            started = time.process_time()
            profiler.enable()
            trainer.update(buffer)
            profiler.disable()
            cpu += time.process_time() - started
    print(f"update: {cpu / args.steps:.3f} CPU s per step (mean of {args.steps}, {args.threads} thread(s))")
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
    print(text.getvalue())


if __name__ == "__main__":
    main()
