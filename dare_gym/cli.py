"""The ``dare-gym`` command line: ``train``, ``eval``, ``envs``, ``algorithms``."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

DEFAULT_CONFIG = "default.yaml"


def default_config_path() -> Path:
    return Path(str(resources.files("dare_gym") / "configs" / DEFAULT_CONFIG))


def _cmd_train(args: argparse.Namespace) -> int:
    from dare_gym.config import load_config
    from dare_gym.trainer import TrainConfig, Trainer

    config_path = args.config or default_config_path()
    config = load_config(TrainConfig, config_path, args.overrides)
    print(f"config: {config_path}" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))
    print(f"training {config.algorithm['name']} on {config.env} with policy {config.policy!r}; "
          f"output in {config.output_dir}")
    summary = Trainer(config).train(resume=args.resume)
    before, after = summary["heldout_accuracy_before"], summary["heldout_accuracy_after"]
    if before is not None and after is not None:
        print(f"held-out greedy accuracy: before {before:.3f}  after {after:.3f}  "
              f"({100 * (after - before):+.1f} points in {summary['steps']} steps, {summary['elapsed_s']:.0f} s)")
    print(f"metrics: {summary['metrics']}\ncurves:  {summary['plot']}")
    return 0


def _parse_key_values(items: list[str], what: str) -> dict:
    from dare_gym.config import ConfigError, parse_overrides

    try:
        return dict(parse_overrides(items))
    except ConfigError as error:
        raise SystemExit(f"{what}: {error}") from None


def _cmd_eval(args: argparse.Namespace) -> int:
    import dare_gym
    from dare_gym.evaluation import evaluate

    env_kwargs = _parse_key_values(args.env_kwarg, "--env-kwarg")
    env = dare_gym.make(args.env, split=args.split, **env_kwargs)
    policy = dare_gym.load_policy(args.policy)
    generation = _parse_key_values(args.gen, "--gen")
    limit = args.limit if args.limit is not None else (None if env.num_records is not None else 500)
    result = evaluate(policy, env, limit=limit, batch_size=args.batch_size, progress=True, **generation)
    report = {
        "env": args.env, "split": args.split, "policy": args.policy, "records": result.num_records,
        "accuracy": result.accuracy, "mean_reward": result.mean_reward, "generation": generation,
    }
    print(json.dumps(report, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(dict(report, completions=result.completions, correct=result.correct), indent=2))
    return 0


def _cmd_envs(args: argparse.Namespace) -> int:
    import importlib

    import gymnasium

    import dare_gym
    from dare_gym.registry import LAZY_FAMILIES, gymnasium_id

    if args.optional:
        for prefix, module in LAZY_FAMILIES.items():
            try:
                importlib.import_module(module)
            except ImportError as error:
                print(f"({prefix}* envs unavailable: {error})")
    for env_id in dare_gym.list_envs():
        spec = gymnasium.spec(gymnasium_id(env_id))
        module, _, name = str(spec.entry_point).partition(":")
        doc = (getattr(__import__(module, fromlist=[name]), name).__doc__ or "").strip().splitlines()
        print(f"{env_id:<34} {doc[0] if doc else ''}")
    return 0


def _cmd_algorithms(args: argparse.Namespace) -> int:
    import dataclasses

    from dare_gym.algorithms import ALGORITHMS

    for name, entry in sorted(ALGORITHMS.items()):
        defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                    for f in dataclasses.fields(entry.config_class)}
        print(f"{name:<14} {json.dumps(defaults)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dare-gym", description="Post-train diffusion language models with reinforcement learning."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="train a policy (no arguments: the embedded default, ~10 min on a CPU)",
        description="Train a dLLM policy with an RL algorithm. With no arguments, runs the embedded default "
        "(diffu-GRPO on digit sorting with the built-in tiny model). Overrides are dotted "
        "field=value pairs, e.g. `dare-gym train max_steps=20 algorithm.beta=0.0`.",
    )
    train.add_argument("--config", type=Path, help="YAML config file (default: the packaged default.yaml)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learning_rate=5e-5 output_dir=runs/x")
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="score a policy on an env split", description="Score a policy on an env split "
                        "with (by default greedy) completions; prints accuracy and mean reward as JSON.")
    ev.add_argument("--policy", default="tiny", help="policy name or path (default: tiny)")
    ev.add_argument("--env", default="digitsort-v0", help="env id (default: digitsort-v0)")
    ev.add_argument("--split", default="test", help="split (default: test)")
    ev.add_argument("--limit", type=int, help="score only the first N records")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--gen", nargs="*", default=[], metavar="KEY=VALUE",
                    help="sampler settings, e.g. --gen steps=4 temperature=0.5")
    ev.add_argument("--env-kwarg", nargs="*", default=[], metavar="KEY=VALUE", help="extra env arguments")
    ev.add_argument("--output", help="also write the completions and per-record correctness to this JSON file")
    ev.set_defaults(func=_cmd_eval)

    envs = sub.add_parser("envs", help="list the registered envs", description="List the registered env ids.")
    envs.add_argument("--optional", action="store_true",
                      help="also list envs of optional extras (rg/* from reasoning-gym)")
    envs.set_defaults(func=_cmd_envs)

    algos = sub.add_parser("algorithms", help="list the registered algorithms and their defaults",
                           description="List the registered algorithms with their config defaults.")
    algos.set_defaults(func=_cmd_algorithms)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dare_gym.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as error:
        print(f"dare-gym {args.command}: config error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
