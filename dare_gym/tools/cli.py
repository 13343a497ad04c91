"""The ``dare-gym`` command line: ``train``, ``eval`` (``--suite``), ``serve``, ``opencompass``, ``envs``,
``algorithms``, ``standin``, ``compare``.

Bad input (an unknown field, env, policy folder or sampler setting) is reported in one line that names the
bad value and the valid choices, with exit code 2. ``train`` exits 1 when ``strict_rewards`` stops it (a reward
failed on every rollout of a step) and 3 when ``stop_after_no_signal_steps`` steps in a row had no learning
signal (:data:`NO_SIGNAL_EXIT_CODE`); both say why and what to change on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Callable

from dare_gym.core.config import ConfigError, default_config_path

__all__ = ["build_parser", "default_config_path", "main"]

DEFAULT_MINUTES = 5  # the packaged default.yaml's time_limit_minutes (a test keeps them equal)
DEFAULT_STEPS = 150  # and its max_steps
NO_SIGNAL_EXIT_CODE = 3  # `dare-gym train` stopped for lack of learning signal


class _Parser(argparse.ArgumentParser):
    """An argument parser whose epilog is built only when help is shown (the field list imports torch)."""

    def __init__(self, *args, epilog_fn: Callable[[], str] | None = None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.epilog_fn = epilog_fn

    def format_help(self) -> str:
        if self.epilog_fn is not None:
            self.epilog = self.epilog_fn()
        return super().format_help()


def _fill(text: str) -> str:
    return textwrap.fill(text, width=100)


def check_policy_name(name: str, where: str) -> None:
    """Fail at once on a policy that names no local folder and cannot be a hub id (``org/name``), instead of
    after the hub's retries: ``tiny`` and existing folders pass, and so does ``org/name`` unless ``org`` is a
    local folder (then a folder was meant)."""
    from dare_gym.core.policy import BUILTIN_POLICIES

    path = Path(name).expanduser()
    if name in BUILTIN_POLICIES or path.exists():
        return
    parts = name.split("/")
    hub_like = len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and not Path(parts[0]).is_dir()
    if not hub_like:
        raise ConfigError(f"{where}: no policy folder {name!r} (give a built-in policy "
                          f"({', '.join(BUILTIN_POLICIES)}), a checkpoint folder or a hub id org/name)")


def _import_modules(specs: list[str]) -> None:
    from dare_gym.train.user_code import import_module

    for spec in specs:
        import_module(spec, where=f"--import {spec}")


# ------------------------------------------------------------------------------------------- train


def _train_fields_help() -> str:
    from dare_gym.core.config import describe_fields
    from dare_gym.train.trainer import TrainConfig

    return "\n".join([
        "config fields (set in --config's YAML or as field=value; the defaults are the packaged default.yaml):",
        *describe_fields(TrainConfig),
        "",
        "algorithm.<field>: the fields of the algorithm named by algorithm.name (`dare-gym algorithms NAME`).",
    ])


def train_config_data(config: Path | None, overrides: list[str], imports: list[str], resume: bool) -> tuple[dict, str]:
    """The config dict of ``dare-gym train`` and where it came from. ``--resume`` without ``--config``
    continues the run as its output_dir's config.json recorded it (overrides still apply)."""
    from dare_gym.core.config import load_config_dict
    from dare_gym.train.trainer import TrainConfig

    source = config or default_config_path()
    data = load_config_dict(source, overrides)
    if resume and config is None:
        saved = Path(data.get("output_dir", TrainConfig.output_dir)) / "config.json"
        if saved.is_file():
            source, data = f"{saved} (the run's saved config)", load_config_dict(saved, overrides)
    if imports:
        existing = data.get("imports") or []
        data["imports"] = [*existing, *imports] if isinstance(existing, list) else existing
    return data, str(source)


def _cmd_train(args: argparse.Namespace) -> int:
    from dare_gym.core.config import dataclass_from_dict
    from dare_gym.envs.data import DataFormatError
    from dare_gym.train.trainer import TrainConfig, Trainer

    from dare_gym.train.config import resolve

    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    data, source = train_config_data(args.config, args.overrides, args.imports, args.resume)
    config = dataclass_from_dict(TrainConfig, data)
    check_policy_name(config.policy, "policy")
    # the whole configuration is checked before anything is launched or loaded, once, in this process
    resolve(config, processes=args.nproc or int(os.environ.get("WORLD_SIZE", "1")))
    if args.nproc and args.nproc > 1:
        return _launch_torchrun(args)
    from dare_gym.core import distributed

    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        print(f"config: {source}" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        print(f"training {config.algorithm['name']} on {config.env} with policy {config.policy!r}"
              f"{f' on {processes} processes ({config.strategy})' if processes > 1 else ''}; "
              f"output in {config.output_dir}", flush=True)
    try:
        trainer = Trainer(config)
    except (FileNotFoundError, DataFormatError) as error:  # a policy folder or data file missing or malformed
        raise ConfigError(str(error)) from None
    if args.resume and trainer.latest_checkpoint() is None:
        raise ConfigError(f"--resume: no checkpoint under {trainer.checkpoint_root()}")
    from dare_gym.train.signal import RewardFailedEverywhere

    try:
        summary = trainer.train(resume=args.resume)
    except RewardFailedEverywhere as error:
        if main:
            print(f"dare-gym train: error: {error}", file=sys.stderr)
        return 1
    finally:
        distributed.teardown()
    code = NO_SIGNAL_EXIT_CODE if summary["stopped_by"] == "no_signal" else 0
    if summary["stop_message"] and main:
        print(f"dare-gym train: {summary['stop_message']}", file=sys.stderr)
    if not main:
        return code
    before, after = summary["heldout_accuracy_before"], summary["heldout_accuracy_after"]
    if before is not None and after is not None:
        print(f"held-out greedy accuracy: before {before:.3f}  after {after:.3f}  "
              f"({100 * (after - before):+.1f} points in {summary['steps']} steps, {summary['elapsed_s']:.0f} s)")
    print(f"metrics: {summary['metrics']}\ncurves:  {summary['plot']}")
    return code


def _launch_torchrun(args: argparse.Namespace) -> int:
    """``dare-gym train --nproc N ...``: the same command under ``torchrun --nproc-per-node N`` (one machine)."""
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               "-m", "dare_gym"]
    command += [flag for spec in args.imports for flag in ("--import", spec)] + ["train"]
    if args.config is not None:
        command += ["--config", str(args.config)]
    if args.resume:
        command.append("--resume")
    command += list(args.overrides)
    print("launching: " + " ".join(command[2:]), flush=True)
    return subprocess.call(command)


# -------------------------------------------------------------------------------------------- eval


def _parse_key_values(items: list[str], what: str) -> dict:
    """``key=value`` items (values parsed as YAML; dotted keys nest: ``options.threshold=0.9``)."""
    from dare_gym.core.config import parse_overrides, set_dotted

    try:
        values: dict = {}
        for key, value in parse_overrides(items):
            set_dotted(values, key, value)
        return values
    except ConfigError as error:
        raise ConfigError(f"{what}: {error}") from None


def env_arguments(env_id: str) -> list[str] | None:
    """The keyword arguments env ``env_id``'s class accepts (None when it cannot be told)."""
    import importlib
    import inspect

    import gymnasium

    from dare_gym.registry import gymnasium_id

    entry = gymnasium.spec(gymnasium_id(env_id)).entry_point
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        entry = getattr(importlib.import_module(module), name)
    if not isinstance(entry, type):
        return None
    names: list[str] = []
    for klass in entry.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names += [p.name for p in parameters if p.name != "self" and p.name not in names
                  and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            return names
    return None


def make_env(env_id: str, split: str, kwargs: dict, where: str = "--env"):
    """``dare_gym.make`` for the command line: a bad env id, split or argument is a :class:`ConfigError`
    (``where`` names the option that gave the env id)."""
    import gymnasium

    import dare_gym
    from dare_gym.train.user_code import resolve_env_kwargs

    if env_id not in dare_gym.list_envs():
        raise ConfigError(f"{where}: unknown env {env_id!r}; registered: {', '.join(dare_gym.list_envs())}")
    kwargs = resolve_env_kwargs(kwargs, where="--env-kwarg")
    accepted = env_arguments(env_id)
    unknown = sorted(set(kwargs) - set(accepted)) if accepted is not None else []
    if unknown:
        raise ConfigError(f"--env-kwarg: {env_id} has no argument {', '.join(map(repr, unknown))}; "
                          f"its arguments: {', '.join(a for a in accepted if a != 'split')}")
    try:
        return dare_gym.make(env_id, split=split, **kwargs)
    except (ValueError, TypeError, FileNotFoundError, gymnasium.error.Error) as error:
        raise ConfigError(f"{where} {env_id} --split {split}: {error}" if where == "--env"
                          else f"{where} {env_id}:{split}: {error}") from None


def load_cli_policy(name: str, device: str, dtype: str, family: str | None, where: str = "--policy"):
    """``dare_gym.load_policy`` for the command line: a bad name, folder, device or dtype is a
    :class:`ConfigError` naming it."""
    import dare_gym
    from dare_gym.train.console import quiet_library_warnings
    from dare_gym.core.device import resolve_device, resolve_dtype

    check_policy_name(name, where)
    try:
        resolved = resolve_device(device)
        resolved_dtype = resolve_dtype(dtype, resolved)
    except ValueError as error:
        raise ConfigError(f"--device/--dtype: {error}") from None
    try:
        with quiet_library_warnings():
            return dare_gym.load_policy(name, device=resolved, dtype=resolved_dtype, family=family)
    except (OSError, ValueError) as error:  # FileNotFoundError included
        raise ConfigError(f"{where}: {error} (give a built-in policy, a checkpoint folder or a hub id)") from None


def generation_settings(items: list[str]) -> dict:
    """``--gen key=value`` items as ``policy.generate`` keyword arguments (validated, bad values named)."""
    from dare_gym.core.config import dataclass_from_dict
    from dare_gym.train.trainer import GenerationConfig

    return dataclass_from_dict(GenerationConfig, _parse_key_values(items, "--gen"), where="--gen").as_kwargs()


def generation_record(policy, generation: dict) -> dict:
    """Every setting the sampler ran with (``--gen`` over the policy's defaults, defaults included), as a
    result records them."""
    import dataclasses

    settings = dict(generation)
    name, options = policy.sampler_settings(settings.pop("sampler", None), settings)
    return {"sampler": name, **dataclasses.asdict(options)}


def _cmd_eval(args: argparse.Namespace) -> int:
    from dare_gym.train.evaluation import evaluate

    _import_modules(args.imports)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    generation = generation_settings(args.gen)
    if args.suite is not None:
        return _eval_suite(args, generation)
    if len(args.policy) > 1:
        raise ConfigError(f"--policy: {len(args.policy)} policies given ({' '.join(args.policy)}); scoring several "
                          "needs --suite")
    for name in ("samples", "k", "sample_temperature"):
        if getattr(args, name) is not None:
            raise ConfigError(f"--{name.replace('_', '-')} applies to --suite only")
    env_id = args.env or "digitsort-v0"
    env = make_env(env_id, args.split, _parse_key_values(args.env_kwarg, "--env-kwarg"))
    policy = load_cli_policy(args.policy[0], args.device, args.dtype, args.family)
    limit = args.limit if args.limit is not None else (None if env.num_records is not None else 500)
    result = evaluate(policy, env, limit=limit, batch_size=args.batch_size, progress=True, **generation)
    report = {
        "env": env_id, "split": args.split, "policy": args.policy[0], "records": result.num_records,
        "accuracy": result.accuracy, "mean_reward": result.mean_reward,
        "generation": generation_record(policy, generation),
    }
    print(json.dumps(report, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(dict(report, completions=result.completions, correct=result.correct),
                                                indent=2))
    return 0


def _eval_suite(args: argparse.Namespace, generation: dict) -> int:
    """``dare-gym eval --suite``: every policy on every env, greedy accuracy and pass@k (:mod:`dare_gym.tools.suite`)."""
    from dare_gym.tools.suite import (
        DEFAULT_SUITE,
        BenchmarkSpec,
        SuiteConfig,
        markdown_tables,
        run_suite,
        write_report,
    )

    if args.env is not None:
        raise ConfigError("--env: give the envs to --suite (e.g. --suite gsm8k-v0 math500-v0:test)")
    samples = 8 if args.samples is None else args.samples
    ks = args.k if args.k is not None else sorted({1, samples}) if samples else []
    temperature = 0.8 if args.sample_temperature is None else args.sample_temperature
    benchmarks = [BenchmarkSpec.parse(text, args.split) for text in (args.suite or DEFAULT_SUITE)]
    env_kwargs = _parse_key_values(args.env_kwarg, "--env-kwarg")
    for name in args.policy:
        check_policy_name(name, "--policy")
    try:
        config = SuiteConfig(benchmarks=benchmarks, policies=list(args.policy), num_samples=samples, ks=ks,
                             sample_temperature=temperature, greedy=not args.no_greedy, limit=args.limit,
                             seed=args.seed, batch_size=args.batch_size, generation=generation)
    except ValueError as error:
        raise ConfigError(f"--suite: {error}") from None
    report = run_suite(
        config, load_policy=lambda name: load_cli_policy(name, args.device, args.dtype, args.family),
        make_env=lambda spec: make_env(spec.env, spec.split, env_kwargs, where="--suite"), progress=True,
        log=lambda line: print(line, file=sys.stderr, flush=True))
    paths = write_report(report, args.output or "runs/eval-suite")
    print(markdown_tables(report))
    print(f"json:     {paths['json']}\nmarkdown: {paths['markdown']}")
    return 0


# ---------------------------------------------------------------------------------------------- serve


def require_extra(extra: str, modules: tuple[str, ...], command: str) -> None:
    """A :class:`ConfigError` naming the extra to install when one of ``modules`` is missing."""
    import importlib

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"{command} needs the {extra} extra ({', '.join(missing)} not installed): "
                          f"pip install 'dare-gym[{extra}]'")


def _cmd_serve(args: argparse.Namespace) -> int:
    require_extra("serve", ("fastapi", "uvicorn"), "dare-gym serve")
    from dare_gym.tools.serve import WorkerDied, is_loopback, serve

    _import_modules(args.imports)
    for name in ("max_batch_size", "max_n", "max_prompts"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch_wait_ms < 0:
        raise ConfigError(f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    generation = generation_settings(args.gen)
    policy = load_cli_policy(args.policy, args.device, args.dtype, args.family, where="policy")
    policy.generation_defaults.update(generation)
    if not is_loopback(args.host):
        print(f"dare-gym serve: warning: listening on {args.host}, reachable beyond this machine"
              + ("" if args.api_key else "; no --api-key is set"), file=sys.stderr)
    try:
        serve(policy, model_name=args.served_model_name or args.policy, host=args.host, port=args.port,
              max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, max_model_len=args.max_model_len,
              max_n=args.max_n, max_prompts=args.max_prompts, api_key=args.api_key, seed=args.seed,
              allow_weight_loading=args.allow_weight_loading, announce=lambda line: print(line, flush=True))
    except OSError as error:  # the address is taken or cannot be bound
        raise ConfigError(f"--host {args.host} --port {args.port}: {error.strerror or error}") from None
    except WorkerDied as error:  # it failed /health and shut down: exit non-zero, so a supervisor restarts it
        print(f"dare-gym serve: error: {error}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------- opencompass


def _cmd_opencompass(args: argparse.Namespace) -> int:
    from dare_gym.tools.opencompass import (
        OpenCompassError,
        OpenCompassFailed,
        OpenCompassInputError,
        evaluate_with_opencompass,
        tokenizer_source,
    )

    _import_modules(args.imports)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_out_len is not None and args.max_out_len < 1:
        raise ConfigError(f"--max-out-len must be >= 1, got {args.max_out_len}")
    if not args.datasets and not args.custom_dataset:
        raise ConfigError("give --datasets NAME ... and/or --custom-dataset FILE.jsonl")
    generation = generation_settings(args.gen)
    policy = load_cli_policy(args.policy, args.device, args.dtype, args.family, where="policy")
    policy.generation_defaults.update(generation)
    log = lambda line: print(f"dare-gym opencompass: {line}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        result = evaluate_with_opencompass(
            policy, model_name=args.served_model_name or args.policy, tokenizer_path=tokenizer_source(args.policy),
            datasets=args.datasets, custom_datasets=args.custom_dataset, venv=args.venv, work_dir=args.work_dir,
            data_root=args.data_root, limit=args.limit, max_out_len=args.max_out_len, batch_size=args.batch_size,
            timeout_s=args.timeout, log=log)
    except OpenCompassInputError as error:
        raise ConfigError(str(error)) from None
    except OpenCompassFailed as failed:
        print(_opencompass_table(failed.summary))
        for task, why in failed.failures.items():
            print(f"dare-gym opencompass: error: task {task} failed: {why}", file=sys.stderr)
        return 1
    except OpenCompassError as error:
        print(f"dare-gym opencompass: error: {error}", file=sys.stderr)
        return 1
    print(_opencompass_table(result))
    print(f"summary: {result.summary_csv}\nseconds: {result.seconds:.0f} (install {result.install_seconds:.0f})")
    return 0


def _opencompass_table(result) -> str:
    rows = [f"| {r.dataset} | {r.metric} | {'-' if r.score is None else f'{r.score:.2f}'} |" for r in result.rows]
    return "\n".join(["| dataset | metric | score |", "|---|---|---|", *rows])


# ------------------------------------------------------------------------------------ envs, algorithms


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


def _first_sentence(doc: str | None) -> str:
    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]


def _cmd_algorithms(args: argparse.Namespace) -> int:
    import inspect

    from dare_gym.algorithms import get_algorithm, list_algorithms
    from dare_gym.core.config import describe_fields

    _import_modules(args.imports)
    if args.table:
        print(support_table(args.names or None))
        return 0
    names = args.names or list_algorithms()
    print("Choose one with algorithm.name=NAME and set a field with algorithm.<field>=value (dare-gym train, "
          "compare); the defaults are each algorithm's official code's, response_mask included.\n")
    for name in names:
        try:
            entry = get_algorithm(name)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        doc = inspect.getmodule(entry.algorithm_class).__doc__ or entry.algorithm_class.__doc__ or ""
        summary = _first_sentence(doc)
        print(f"{name}: {summary}" if summary else name)
        source = _followed(doc)
        if source:
            print(f"  followed: {source}")
        print("\n".join(describe_fields(entry.config_class)))
        for preset, values in entry.presets.items():
            shown = ", ".join(f"{key}={json.dumps(value)}" for key, value in values.items())
            print(f"  preset {preset} (algorithm.preset={preset}): {shown}")
        print()
    return 0


def support_table(names: list[str] | None = None) -> str:
    """The algorithm × model family table of the README, from the registries: ✓ where the algorithm trains the
    family, ✗ with a numbered reason where it refuses it (:meth:`Algorithm.refusal`)."""
    from dare_gym.algorithms import get_algorithm, list_algorithms
    from dare_gym.models.families import FAMILIES

    families = list(FAMILIES.values())
    reasons: list[str] = []
    lines = ["| algorithm | " + " | ".join(f.name for f in families) + " |", "|---|" + "---|" * len(families)]
    for name in names or list_algorithms():
        cells = []
        for family in families:
            reason = get_algorithm(name).algorithm_class.refusal(family)
            if reason is None:
                cells.append("✓")
                continue
            if reason not in reasons:
                reasons.append(reason)
            cells.append(f"✗ ({reasons.index(reason) + 1})")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += [""] + [f"({number}) {reason}" for number, reason in enumerate(reasons, 1)] if reasons else []
    return "\n".join(lines)


def _followed(doc: str) -> str:
    """The sentence of an algorithm's docstring that says which source it follows (``Followed: ...``)."""
    text = " ".join(doc.split())
    start = text.find("Followed:")
    if start < 0:
        return ""
    sentence = text[start + len("Followed:"):].strip()
    end = sentence.find(". ")
    return sentence if end < 0 else sentence[: end + 1]


# ----------------------------------------------------------------------------------------- standin


def _cmd_standin(args: argparse.Namespace) -> int:
    from dare_gym.models.families import FAMILIES, get_family
    from dare_gym.models.standin import build_standin

    try:
        get_family(args.family)
    except ValueError as error:
        raise ConfigError(f"FAMILY: {error}") from None
    for option, folder in (("--from", args.source), ("--tokenizer-from", args.tokenizer_source)):
        if folder is not None and not (folder / "config.json").is_file() and option == "--from":
            raise ConfigError(f"--from: {str(folder)!r} has no config.json: give a checkpoint folder (its config, "
                              f"weight index and tokenizer files; no weights needed), e.g. ../shared/families/...")
        if folder is not None and not folder.is_dir():
            raise ConfigError(f"{option}: no folder {str(folder)!r}")
    if args.out.exists() and any(args.out.iterdir()):
        raise ConfigError(f"--out: {str(args.out)!r} is not empty; give a new folder")
    try:
        folder = build_standin(args.family, args.out, source=args.source, tokenizer_source=args.tokenizer_source,
                               seed=args.seed)
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise ConfigError(f"standin {args.family}: {error}") from None
    print(f"wrote a {args.family} stand-in ({'from ' + str(args.source) if args.source else 'small config'}) to "
          f"{folder}; families: {', '.join(FAMILIES)}")
    print(f"try it:  dare-gym eval --policy {folder} --limit 8\n"
          f"         dare-gym train policy={folder} max_steps=2 eval_size=8")
    return 0


# ----------------------------------------------------------------------------------------- compare


def _cmd_compare(args: argparse.Namespace) -> int:
    from dare_gym.tools.compare import run_comparison

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
        sft_batch_size=args.sft_batch_size, imports=args.imports, shared_recipe=args.shared_recipe,
        run_timeout=args.run_timeout, resume=args.resume,
    )
    print(f"\n{report['table']}\n")
    for name, path in report["files"].items():
        print(f"{name:<13} {path}")
    return 0 if any(run["error"] is None for run in report["runs"]) else 1


# ------------------------------------------------------------------------------------------ parser


def _add_import(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help=f"import a module (a name, looked up in the current directory too, or a .py path) "
                        f"first, {what}; repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dare-gym", description="Post-train diffusion language models with reinforcement learning.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser(
        "train", help=f"train a policy (no arguments: the embedded default, {DEFAULT_STEPS} steps on a CPU)",
        description=_fill("Train a dLLM policy with an RL algorithm. With no arguments, runs the embedded default "
                          f"(diffu-GRPO on digit sorting with the built-in tiny model, {DEFAULT_STEPS} steps, about 3.5 "
                          f"minutes on a quiet 2-core CPU; a {DEFAULT_MINUTES}-minute guard stops it earlier on a slow "
                          "machine and says so). Exit codes: 2 bad configuration, 1 a reward failed on every rollout "
                          f"under strict_rewards, {NO_SIGNAL_EXIT_CODE} stopped after stop_after_no_signal_steps steps "
                          "with no learning signal. Overrides are dotted field=value pairs:")
        + "\n\n  dare-gym train max_steps=20 algorithm.beta=0.0\n"
        "  dare-gym train env_kwargs.reward=my_rewards:exact        # fn exact in ./my_rewards.py\n"
        "  dare-gym train --import path/to/rewards.py 'env_kwargs.reward=[[rewards:exact, 1.0], [format, 0.1]]'",
        epilog_fn=_train_fields_help,
    )
    train.add_argument("--config", type=Path, help="YAML config file (default: the packaged default.yaml)")
    train.add_argument("--nproc", type=int, metavar="N",
                       help="train with N processes on this machine (starts torchrun; strategy=ddp or fsdp)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the last checkpoint in output_dir; without --config, with the config the "
                       "run saved there (overrides still apply, e.g. a larger max_steps)")
    _add_import(train, "to register rewards, envs or algorithms (recorded in the run's config)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learning_rate=5e-5 output_dir=runs/x")
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser(
        "eval", help="score a policy on an env split, or policies on a suite of envs (pass@k)",
        description=_fill("Score a policy on an env split with (by default greedy) completions; prints accuracy "
                          "and mean reward as JSON. With --suite, score every --policy on every env of the suite: "
                          "greedy accuracy and pass@k from --samples completions per problem (the unbiased "
                          "estimator), printed and written as Markdown tables (rows benchmarks, columns policies) "
                          "and JSON to --output (default runs/eval-suite):")
        + "\n\n  dare-gym eval --suite digitsort-v0 countdown-v0 --policy tiny runs/x/final_policy --limit 100 "
        "--samples 8 --k 1 8")
    ev.add_argument("--policy", nargs="+", default=["tiny"], metavar="POLICY",
                    help="policy name, checkpoint folder or hub id (default: tiny); several with --suite")
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    ev.add_argument("--dtype", default="float32", help="float32 | bfloat16 | auto (default: float32)")
    ev.add_argument("--family", help="force a model family (tiny, llada, dream, sdar) over config.json's model_type")
    ev.add_argument("--env", help="env id (default: digitsort-v0; `dare-gym envs` lists them)")
    ev.add_argument("--split", default="test", help="split (default: test; with --suite, of every env without :SPLIT)")
    ev.add_argument("--limit", type=int, help="score only the first N records (of every env, with --suite)")
    ev.add_argument("--batch-size", type=int, default=256, help="prompts per generate call (default: 256)")
    ev.add_argument("--gen", nargs="*", default=[], metavar="KEY=VALUE",
                    help="sampler settings: gen_length, steps, block_length, temperature, remasking, sampler "
                    "(llada, fast_dllm, block_diffusion) and its options.*; e.g. --gen steps=4 temperature=0.5, "
                    "--gen sampler=fast_dllm options.cache=dual options.threshold=0.9")
    ev.add_argument("--env-kwarg", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra env arguments, e.g. --env-kwarg reward=my_rewards:exact")
    ev.add_argument("--output", help="also write the completions and per-record correctness to this JSON file "
                    "(with --suite: the folder for suite.json and suite.md, default runs/eval-suite)")
    suite = ev.add_argument_group("suite (pass@k over several envs and policies)")
    suite.add_argument("--suite", nargs="*", metavar="ENV[:SPLIT]",
                       help="score on these envs (no ids: " + " ".join(
                           ("gsm8k-v0", "math500-v0", "humaneval-v0", "mbpp-v0", "countdown-v0", "sudoku4-v0"))
                       + ")")
    suite.add_argument("--samples", type=int, metavar="N", help="sampled completions per problem (default: 8; 0: "
                       "greedy only)")
    suite.add_argument("--k", type=int, nargs="+", metavar="K", help="report pass@k for these k <= N (default: 1 N)")
    suite.add_argument("--sample-temperature", type=float, metavar="T",
                       help="temperature of the sampled completions (default: 0.8; greedy ones use 0)")
    suite.add_argument("--no-greedy", action="store_true", help="skip the greedy pass")
    suite.add_argument("--seed", type=int, default=0, help="seed of the sampled completions (default: 0)")
    _add_import(ev, "to register rewards or envs")
    ev.set_defaults(func=_cmd_eval)

    srv = sub.add_parser(
        "serve", help="serve a policy behind an OpenAI-compatible HTTP API",
        description=_fill("Serve a policy (a name, checkpoint folder or hub id) as an OpenAI-compatible server: "
                          "/v1/models, /v1/completions, /v1/chat/completions (the chat template of instruct "
                          "checkpoints). Concurrent requests are batched into one sampler call; sampler settings "
                          "ride as extra request fields (sampler, steps, block_length, threshold, ...), with --gen "
                          "and the policy's defaults otherwise. Listens on 127.0.0.1 unless --host says otherwise:")
        + "\n\n  dare-gym serve runs/x/final_policy --port 8000 --gen steps=32\n"
        "  python -c \"import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-'); "
        "print(c.completions.create(model='runs/x/final_policy', prompt='sort 583920\\\\n').choices[0].text)\"")
    srv.add_argument("policy", nargs="?", default="tiny", help="policy name, checkpoint folder or hub id (default: tiny)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback only)")
    srv.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: a free one, printed)")
    srv.add_argument("--served-model-name", help="the model id clients send (default: the policy argument)")
    srv.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    srv.add_argument("--dtype", default="float32", help="float32 | bfloat16 | auto (default: float32)")
    srv.add_argument("--family", help="force a model family (tiny, llada, dream, sdar) over config.json's model_type")
    srv.add_argument("--gen", nargs="*", default=[], metavar="KEY=VALUE",
                     help="default sampler settings, as for eval (requests override them)")
    srv.add_argument("--max-batch-size", type=int, default=32, help="rows (prompts x n) per sampler call (default: 32)")
    srv.add_argument("--batch-wait-ms", type=float, default=5.0,
                     help="how long to collect requests for a batch after the first arrives (default: 5)")
    srv.add_argument("--max-model-len", type=int,
                     help="prompt + generated tokens at most (default: the config's max_position_embeddings)")
    srv.add_argument("--max-n", type=int, default=64, help="the largest n a request may ask (default: 64)")
    srv.add_argument("--max-prompts", type=int, default=64, help="the most prompts a request may send (default: 64)")
    srv.add_argument("--api-key", help="require this key (Authorization: Bearer KEY) on /v1/ routes")
    srv.add_argument("--seed", type=int, default=0, help="seed of unseeded sampled requests (default: 0)")
    srv.add_argument("--allow-weight-loading", action="store_true",
                     help="accept POST /dare/load_weights {path}: a training run's weight sync (trusted clients only)")
    _add_import(srv, "to register model families or samplers")
    srv.set_defaults(func=_cmd_serve)

    oc = sub.add_parser(
        "opencompass", help="score a policy on OpenCompass benchmarks through `dare-gym serve`",
        description=_fill("Score a policy with OpenCompass 0.5.4, which runs in a venv of its own (created on first "
                          "use, reused after) and talks to the policy served on a loopback port by this command. "
                          "Exits 1 naming every task that produced no score (OpenCompass itself exits 0 then):")
        + "\n\n  dare-gym opencompass runs/x/final_policy --datasets gsm8k math500 humaneval --limit 100\n"
        "  dare-gym opencompass tiny --custom-dataset my_qa.jsonl     # {\"question\": ..., \"answer\": ...} per line")
    oc.add_argument("policy", help="policy name, checkpoint folder or hub id")
    oc.add_argument("--datasets", nargs="*", default=[], metavar="NAME",
                    help="OpenCompass dataset configs: gsm8k, math, math500, humaneval, mbpp or any config name "
                    "(e.g. gsm8k_0shot_v2_gen_a58960)")
    oc.add_argument("--custom-dataset", action="append", default=[], metavar="FILE.jsonl",
                    help="a local QA dataset in OpenCompass's custom format, scored by exact match; repeatable")
    oc.add_argument("--limit", type=int, help="score only the first N records of each dataset")
    oc.add_argument("--max-out-len", type=int, help="default max_tokens of a request (default: the policy's "
                    "gen_length; dataset configs may set their own)")
    oc.add_argument("--batch-size", type=int, default=32,
                    help="concurrent requests and rows per sampler call (default: 32)")
    oc.add_argument("--gen", nargs="*", default=[], metavar="KEY=VALUE", help="sampler settings, as for serve")
    oc.add_argument("--venv", default=str(Path("~/.cache/dare_gym/opencompass-venv")),
                    help="OpenCompass's venv, created if missing (default: ~/.cache/dare_gym/opencompass-venv)")
    oc.add_argument("--work-dir", default="runs/opencompass", help="OpenCompass's outputs (default: runs/opencompass)")
    oc.add_argument("--data-root", default=str(Path("~/.cache/dare_gym/opencompass-data")),
                    help="COMPASS_DATA_CACHE: OpenCompass's data; GSM8K and MBPP are linked from DARE_GYM_DATA_DIR "
                    "(default: ~/.cache/dare_gym/opencompass-data)")
    oc.add_argument("--served-model-name", help="the model id in requests and tables (default: the policy argument)")
    oc.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    oc.add_argument("--dtype", default="float32", help="float32 | bfloat16 | auto (default: float32)")
    oc.add_argument("--family", help="force a model family (tiny, llada, dream, sdar) over config.json's model_type")
    oc.add_argument("--timeout", type=float, metavar="SECONDS", help="stop OpenCompass after this long")
    _add_import(oc, "to register model families or samplers")
    oc.set_defaults(func=_cmd_opencompass)

    envs = sub.add_parser("envs", help="list the registered envs", description="List the registered env ids.")
    envs.add_argument("--optional", action="store_true",
                      help="also list envs of optional extras (rg/* from reasoning-gym)")
    envs.set_defaults(func=_cmd_envs)

    algos = sub.add_parser("algorithms", help="list the registered algorithms and their config fields",
                           description="List the registered algorithms with each config field, its default and "
                           "what it does; set them as algorithm.<field>=value.")
    algos.add_argument("names", nargs="*", metavar="NAME", help="only these algorithms")
    algos.add_argument("--table", action="store_true",
                       help="print the algorithm × model family table (supported, or refused with the reason)")
    _add_import(algos, "to list out-of-tree algorithms")
    algos.set_defaults(func=_cmd_algorithms)

    standin = sub.add_parser(
        "standin", help="write a tiny stand-in of a real model family (its real files, random small weights)",
        description=_fill("Write a stand-in checkpoint of a model family: the real config.json of --from with its "
                          "sizes cut down, random weights under exactly the real weight names that the shrunk "
                          "layer count keeps, and the real tokenizer files (LLaDA: a tokenizer with the real special "
                          "ids and chat template). Every command takes the folder as a policy, so a family can be "
                          "tried end to end on a CPU with no download. Without --from: the project's small config "
                          "of the family:")
        + "\n\n  dare-gym standin sdar --from ../shared/families/SDAR-1dot7B-Chat --out runs/sdar-standin\n"
        "  dare-gym train policy=runs/sdar-standin max_steps=2 eval_size=8")
    standin.add_argument("family", metavar="FAMILY", help="llada, dream, sdar, llada2, ... (the registered families)")
    standin.add_argument("--from", dest="source", type=Path, metavar="FOLDER",
                         help="a real checkpoint folder (config.json, weight index, tokenizer files; no weights)")
    standin.add_argument("--tokenizer-from", dest="tokenizer_source", type=Path, metavar="FOLDER",
                         help="take the tokenizer from this folder when --from has none (SDAR-4B: SDAR-1.7B's)")
    standin.add_argument("--out", type=Path, required=True, metavar="DIR", help="the new checkpoint folder")
    standin.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    standin.set_defaults(func=_cmd_standin)

    cmp = sub.add_parser(
        "compare", help="compare algorithms on equal rollout budgets over several seeds",
        description="Train each algorithm for each seed, each run in its own process, on the same env, policy "
        "and held-out set with the same number of rollouts (max_steps = budget // (prompts_per_step x "
        "group_size)); write results.csv, summary.md, curves.png and compare.json to --output and print a "
        "Markdown table. Each algorithm runs its own defaults plus the config's algorithm_options for it; the "
        "config's algorithm: section applies only to the algorithm it names unless --shared-recipe. Overrides are "
        "dotted field=value pairs applied to every run; algorithm.<field>=value applies to the algorithms whose "
        "config has that field.",
    )
    cmp.add_argument("--algorithms", nargs="+", required=True, metavar="NAME",
                     help="registered algorithm names, or 'all'")
    cmp.add_argument("--seeds", nargs="+", default=["0", "1", "2"], metavar="SEED", help="seeds (default: 0 1 2)")
    cmp.add_argument("--budget-rollouts", type=int, required=True, metavar="N",
                     help="rollouts (sampled completions) per run; the same for every run")
    cmp.add_argument("--config", type=Path, help="YAML config with the shared settings "
                     "(default: the packaged default.yaml)")
    cmp.add_argument("--sft-baseline", action="store_true",
                     help="add continued SFT on gold answers for each seed, for the mean RL train time of that seed")
    cmp.add_argument("--sft-batch-size", type=int, default=64, help="SFT batch size (default: 64)")
    cmp.add_argument("--output", type=Path, default=Path("runs/compare"), help="output folder (default: runs/compare)")
    cmp.add_argument("--threshold", type=float, default=0.8,
                     help="report the first step whose held-out accuracy reaches this (default: 0.8)")
    cmp.add_argument("--shared-recipe", action="store_true",
                     help="apply the config's algorithm: options to every algorithm whose config has those fields "
                     "(one shared recipe) instead of only to the algorithm it names")
    cmp.add_argument("--no-shared-recipe", action="store_false", dest="shared_recipe",
                     help=argparse.SUPPRESS)  # the default since the per-algorithm recipes; kept for old scripts
    _add_import(cmp, "in every run too (registers out-of-tree algorithms, rewards or envs)")
    cmp.add_argument("--run-timeout", type=float, metavar="SECONDS", help="kill and record a run after this long")
    cmp.add_argument("--resume", action="store_true",
                     help="keep the finished runs of an earlier comparison in --output whose settings (algorithm "
                     "defaults included) are unchanged; run the rest (failed, unfinished or changed runs)")
    cmp.add_argument("overrides", nargs="*", help="dotted overrides for every run, e.g. eval_size=100 algorithm.beta=0")
    cmp.set_defaults(func=_cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as error:
        print(f"dare-gym {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
