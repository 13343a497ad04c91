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
    from dare_gym.envs.base import describe_splits

    previous: list[str] = []
    for env_id in dare_gym.list_envs():
        spec = gymnasium.spec(gymnasium_id(env_id))
        module, _, name = str(spec.entry_point).partition(":")
        env_class = getattr(__import__(module, fromlist=[name]), name)
        doc = (env_class.__doc__ or "").strip().splitlines()
        print(f"{env_id:<34} {doc[0] if doc else ''}")
        splits = describe_splits(env_class) if getattr(env_class, "splits", ()) else []
        if splits != previous:  # a family sharing its splits (rg/*) lists them once
            print("\n".join(f"    {line}" for line in splits))
        previous = splits
    print("\n`dare-gym train` trains on an env's default split (env_kwargs.split) and evaluates on its held-out "
          "split (eval_env_kwargs). Procedural training streams never draw a held-out problem; a training split "
          "read from a file that shares records with the held-out set is refused (allow_eval_overlap: true "
          "overrides).")
    return 0


def _cmd_algorithms(args: argparse.Namespace) -> int:
    import dataclasses

    from dare_gym.algorithms import ALGORITHMS

    for name, entry in sorted(ALGORITHMS.items()):
        defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                    for f in dataclasses.fields(entry.config_class)}
        print(f"{name:<14} {json.dumps(defaults)}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from dare_gym.compare import run_comparison
    from dare_gym.config import ConfigError

    # `--seeds 0 1 eval_size=16`: nargs="+" swallows trailing overrides; give them back
    overrides = list(args.overrides)
    algorithms = [a for a in args.algorithms if "=" not in a]
    seeds = []
    for item in args.seeds:
        if "=" in item:
            overrides.append(item)
            continue
        try:
            seeds.append(int(item))
        except ValueError:
            raise ConfigError(f"--seeds: expected integers, got {item!r}") from None
    overrides = [a for a in args.algorithms if "=" in a] + overrides
    report = run_comparison(
        algorithms, seeds, args.budget_rollouts, config_path=args.config or default_config_path(),
        overrides=overrides, output_dir=args.output, threshold=args.threshold, sft_baseline=args.sft_baseline,
        sft_batch_size=args.sft_batch_size, imports=args.imports, shared_recipe=not args.no_shared_recipe,
        run_timeout=args.run_timeout,
    )
    print(f"\n{report['table']}\n")
    for name, path in report["files"].items():
        print(f"{name:<13} {path}")
    return 0 if any(run["error"] is None for run in report["runs"]) else 1


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

    cmp = sub.add_parser(
        "compare", help="compare algorithms on equal rollout budgets over several seeds",
        description="Train each algorithm for each seed, each run in its own process, on the same env, policy "
        "and held-out set with the same number of rollouts (max_steps = budget // (prompts_per_step x "
        "group_size)); write results.csv, summary.md, curves.png and compare.json to --output and print a "
        "Markdown table. Overrides are dotted field=value pairs applied to every run; algorithm.<field>=value "
        "applies to the algorithms whose config has that field.",
    )
    cmp.add_argument("--algorithms", nargs="+", required=True, metavar="NAME",
                     help="registered algorithm names, or 'all'")
    cmp.add_argument("--seeds", nargs="+", default=["0", "1", "2"], metavar="SEED", help="seeds (default: 0 1 2)")
    cmp.add_argument("--budget-rollouts", type=int, required=True, metavar="N",
                     help="rollouts (sampled completions) per run; the same for every run")
    cmp.add_argument("--config", type=Path, help="YAML config with the shared settings and recipe "
                     "(default: the packaged default.yaml)")
    cmp.add_argument("--sft-baseline", action="store_true",
                     help="add continued SFT on gold answers for each seed, for the mean RL train time of that seed")
    cmp.add_argument("--sft-batch-size", type=int, default=64, help="SFT batch size (default: 64)")
    cmp.add_argument("--output", type=Path, default=Path("runs/compare"), help="output folder (default: runs/compare)")
    cmp.add_argument("--threshold", type=float, default=0.8,
                     help="report the first step whose held-out accuracy reaches this (default: 0.8)")
    cmp.add_argument("--no-shared-recipe", action="store_true",
                     help="apply the config's algorithm options only to the algorithm it names; the others run "
                     "at their own defaults")
    cmp.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                     help="import MODULE first, in every run too (registers out-of-tree algorithms); repeatable")
    cmp.add_argument("--run-timeout", type=float, metavar="SECONDS", help="kill and record a run after this long")
    cmp.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. eval_size=100 algorithm.beta=0")
    cmp.set_defaults(func=_cmd_compare)
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
