"""Planning a comparison: which algorithms, which seeds, how many steps, and each algorithm's options.

Every run gets the same shared settings and the same rollout budget (``max_steps = budget_rollouts //
(prompts_per_step × group_size)``, no time limit). Each algorithm starts from its own config's defaults (its
paper's recipe) plus the comparison config's ``algorithm_options`` for it; the config's ``algorithm:`` section
applies only to the algorithm it names, or, with ``shared_recipe=True``, to every algorithm whose config has
those fields (an algorithm that rejects the shared values then runs at its own defaults, with a note).
``algorithm.<field>=value`` overrides apply to every algorithm whose config has that field.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from dare_gym.algorithms import get_algorithm, list_algorithms
from dare_gym.algorithms.base import expand_preset
from dare_gym.core.config import (
    ConfigError,
    dataclass_from_dict,
    default_config_path,
    load_config_dict,
    parse_overrides,
    set_dotted,
)
from dare_gym.train.config import DEFAULT_ALGORITHM, DEFAULT_RECIPE, TrainConfig, refuse_unsupported_family, resolve
from dare_gym.train.user_code import import_module, normalize_module_spec

ALL = "all"
RESERVED = {
    "max_steps": "--budget-rollouts",
    "time_limit_minutes": "--budget-rollouts (budgets are in rollouts, not time)",
    "seed": "--seeds",
    "output_dir": "--output",
    "algorithm.name": "--algorithms",
    "algorithm": "algorithm.<field>=value",
}


def config_fields(name: str) -> list[str]:
    """The init fields of algorithm ``name``'s config dataclass."""
    cls = get_algorithm(name).config_class
    return [f.name for f in dataclasses.fields(cls) if f.init]


def filter_algorithm_options(name: str, options: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Split a recipe's algorithm ``options`` into those algorithm ``name``'s config has (kept) and the rest
    (dropped, sorted). ``name`` in ``options`` is neither kept nor dropped."""
    fields = set(config_fields(name))
    kept = {k: v for k, v in options.items() if k != "name" and k in fields}
    dropped = sorted(k for k in options if k != "name" and k not in fields)
    return kept, dropped


def resolve_algorithms(names: Sequence[str]) -> list[str]:
    """Expand ``all``, drop duplicates (keeping order) and reject unknown names with the registered ones."""
    registered = list_algorithms()
    resolved: list[str] = []
    for name in names:
        for item in registered if name == ALL else [name]:
            if item not in registered:
                raise ConfigError(f"unknown algorithm {item!r}; registered: {', '.join(registered)} (or 'all')")
            if item not in resolved:
                resolved.append(item)
    if not resolved:
        raise ConfigError("no algorithms to compare")
    return resolved


def _split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[tuple[str, str, Any]]]:
    """Shared overrides (kept as strings) and ``algorithm.<field>`` ones as (text, field path, value)."""
    shared, algorithm = [], []
    for text, (key, value) in zip(overrides, parse_overrides(overrides)):
        if key in RESERVED:
            raise ConfigError(f"override {text!r}: {key} is set by the comparison; use {RESERVED[key]}")
        if key.startswith("algorithm."):
            algorithm.append((text, key[len("algorithm."):], value))
        else:
            shared.append(text)
    return shared, algorithm


@dataclasses.dataclass
class ComparisonPlan:
    """What :func:`run_comparison` will run: one config dict (for ``TrainConfig``) per (algorithm, seed)."""

    algorithms: list[str]
    seeds: list[int]
    budget_rollouts: int
    rollouts_per_step: int
    max_steps: int
    shared: dict[str, Any]  # the shared TrainConfig fields, without algorithm/seed/output_dir/max_steps
    options: dict[str, dict[str, Any]]  # algorithm -> its algorithm section (with name)
    dropped: dict[str, list[str]]  # algorithm -> recipe options its config lacks
    ignored_overrides: dict[str, list[str]]  # algorithm -> overrides naming fields its config lacks
    config_errors: dict[str, str]  # algorithm -> why its config is invalid (its runs are recorded as failed)
    notes: list[str]
    resolved: dict[str, Any]  # every shared TrainConfig field with its value (defaults filled in)

    def run_config(self, algorithm: str, seed: int, output_dir: str | Path) -> dict[str, Any]:
        return {
            **json.loads(json.dumps(self.shared)), "algorithm": dict(self.options[algorithm]), "seed": seed,
            "max_steps": self.max_steps, "time_limit_minutes": None, "output_dir": str(output_dir),
            "save_every": self.max_steps + 1, "keep_checkpoints": 1,
        }


def plan_comparison(
    algorithms: Sequence[str],
    seeds: Sequence[int],
    budget_rollouts: int,
    *,
    config_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    shared_recipe: bool = False,
    imports: Sequence[str] = (),
) -> ComparisonPlan:
    """Resolve names, budgets and per-algorithm options; shared config errors raise :class:`ConfigError`.

    ``imports`` (``--import``) join the config's own ``imports:``; both are imported here, before the
    algorithm names are checked, and every run imports them again."""
    if config_path is None:
        config_path = default_config_path()
    shared_overrides, algorithm_overrides = _split_overrides(overrides)
    data = load_config_dict(config_path, shared_overrides)
    data["imports"] = _import_all([*(data.get("imports") or []), *imports], config_path)
    names = resolve_algorithms(algorithms)
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    for key in ("max_steps", "time_limit_minutes", "seed", "output_dir"):
        data.pop(key, None)
    recipe = data.pop("algorithm", None) or {}
    if not recipe and Path(config_path) == default_config_path():  # the packaged default: `dare-gym train`'s recipe
        recipe = dict(DEFAULT_RECIPE)
    if not isinstance(recipe, dict):
        raise ConfigError(f"{config_path}: algorithm must be a mapping, got {recipe!r}")
    recipe_name = recipe.get("name", DEFAULT_ALGORITHM)
    try:  # a preset is its fields, so that --shared-recipe can hand them to other algorithms
        recipe = {"name": recipe_name, **expand_preset(recipe_name, {k: v for k, v in recipe.items() if k != "name"})}
    except ValueError as error:
        raise ConfigError(f"{config_path}: algorithm.preset: {error}") from None
    per_algorithm = data.pop("algorithm_options", None) or {}  # {algorithm: {field: value}}, after the recipe
    if not isinstance(per_algorithm, dict):
        raise ConfigError(f"{config_path}: algorithm_options must map algorithm names to options, got {per_algorithm!r}")
    for name, extra in per_algorithm.items():
        resolve_algorithms([name])  # an unknown algorithm name is an error here
        unknown = sorted(set(extra) - set(config_fields(name)))
        if unknown:
            raise ConfigError(f"{config_path}: algorithm_options.{name}: {', '.join(unknown)} are not fields of "
                              f"{_config_class_name(name)}; valid: {', '.join(sorted(config_fields(name)))}")
    # shared fields are validated once, with the first algorithm at its own defaults
    probe = dataclass_from_dict(TrainConfig, {**data, "algorithm": {"name": names[0]}})
    resolve(probe, policy_files=False)
    rollouts_per_step = probe.prompts_per_step * probe.group_size
    if budget_rollouts < rollouts_per_step:
        raise ConfigError(
            f"--budget-rollouts {budget_rollouts} is less than one step's {rollouts_per_step} rollouts "
            f"({probe.prompts_per_step} prompts × {probe.group_size} completions)"
        )
    max_steps = budget_rollouts // rollouts_per_step
    notes = [
        f"budget: {budget_rollouts} rollouts = {max_steps} steps × {rollouts_per_step} "
        f"({probe.prompts_per_step} prompts × {probe.group_size} completions); time_limit_minutes=null",
        "checkpoints: one at the end of each run (save_every is set past max_steps)",
    ]
    if max_steps * rollouts_per_step != budget_rollouts:
        notes.append(f"{budget_rollouts - max_steps * rollouts_per_step} rollouts of the budget are left unused "
                     f"(not a whole step)")
    options, dropped, ignored, errors = {}, {}, {}, {}
    used_overrides: set[str] = set()
    for name in names:
        own = recipe if shared_recipe or name == recipe_name else {}
        kept, dropped[name] = filter_algorithm_options(name, {k: v for k, v in own.items() if k != "name"})
        if name == recipe_name and dropped[name]:  # the recipe's own algorithm: an unknown option is a typo
            raise ConfigError(f"{config_path}: algorithm option(s) {', '.join(dropped[name])} are not fields of "
                              f"{_config_class_name(name)} ({name}); valid: {', '.join(sorted(config_fields(name)))}")
        fields = set(config_fields(name))
        ignored[name] = []

        def section_with(recipe_options: dict) -> dict:
            section = {"name": name, **json.loads(json.dumps(recipe_options))}
            for text, path, value in algorithm_overrides:
                if path.split(".")[0] in fields:
                    set_dotted(section, path, value)
                    used_overrides.add(text)
                elif text not in ignored[name]:
                    ignored[name].append(text)
            return section

        def invalid(section: dict) -> str | None:
            try:
                config = dataclass_from_dict(TrainConfig, {**data, "algorithm": section})
                resolve(config, policy_files=False)
                refuse_unsupported_family(config)  # e.g. DiPO on a full-attention policy: failed, with the reason
            except (ConfigError, ValueError, TypeError) as error:
                return str(error)
            return None

        own_options = per_algorithm.get(name, {})
        section = section_with({**kept, **own_options})
        if dropped[name]:
            notes.append(f"{name}: dropped recipe option(s) {', '.join(dropped[name])} "
                         f"(not fields of {_config_class_name(name)})")
        if ignored[name]:
            notes.append(f"{name}: ignored override(s) {', '.join(ignored[name])} "
                         f"(no such field in {_config_class_name(name)})")
        error = invalid(section)
        if error and kept and name != recipe_name:
            # the shared recipe has fields this algorithm has but values it rejects (an estimator it cannot
            # use, a KL term it does not have): run it at its own defaults, plus the overrides, and say so
            fallback = section_with(dict(own_options))
            if invalid(fallback) is None:
                notes.append(f"{name}: rejects the shared recipe ({error}); runs at its own defaults instead "
                             f"(recipe options not applied: {', '.join(sorted(kept))})")
                dropped[name] = sorted(set(dropped[name]) | set(kept))
                section, error = fallback, None
        if error:
            errors[name] = f"ConfigError: {error}"
            notes.append(f"{name}: invalid config, its runs are recorded as failed: {error}")
        options[name] = section
    if recipe and len(names) > 1:
        notes.append("--shared-recipe: the config's algorithm options apply to every algorithm that has the field"
                     if shared_recipe else f"the config's algorithm: options apply to {recipe_name} only; the others "
                     "run their own defaults plus algorithm_options (--shared-recipe applies them to all)")
    unused = [text for text, _, _ in algorithm_overrides if text not in used_overrides]
    if unused:
        raise ConfigError(f"override(s) {', '.join(unused)} match no field of any compared algorithm "
                          f"({', '.join(names)})")
    resolved = json.loads(json.dumps(dataclasses.asdict(probe)))
    for key in ("algorithm", "seed", "output_dir", "max_steps", "time_limit_minutes"):
        resolved.pop(key, None)
    return ComparisonPlan(names, seeds, budget_rollouts, rollouts_per_step, max_steps, data, options, dropped,
                          ignored, errors, notes, resolved)


def _config_class_name(name: str) -> str:
    return get_algorithm(name).config_class.__name__



def _import_all(specs: Any, config_path: str | Path) -> list[str]:
    if not isinstance(specs, list):
        raise ConfigError(f"{config_path}: imports must be a list of modules, got {specs!r}")
    for spec in specs:
        import_module(spec, where=f"--import {spec}")
    return list(dict.fromkeys(normalize_module_spec(spec) for spec in specs))
