"""Benchmark suites: several policies on several envs, greedy accuracy and pass@k, as JSON and Markdown.

``dare-gym eval --suite gsm8k-v0 math500-v0 --policy tiny runs/x/final_policy --samples 8 --k 1 8`` scores every
policy on every env's split:

* **greedy**: one completion per record at temperature 0 (the accuracy papers report as "pass@1, greedy");
* **sampled**: ``n`` completions per record at ``sample_temperature``, summarised by pass@k for each requested
  ``k <= n`` with the unbiased estimator of Chen et al. (2021), :func:`pass_at_k`, averaged over records.

The Markdown has one table per metric laid out like DARE's README table: rows are benchmarks, columns are
policies, cells are percentages with one decimal.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

DEFAULT_SUITE = ("gsm8k-v0", "math500-v0", "humaneval-v0", "mbpp-v0", "countdown-v0", "sudoku4-v0")
"""The benchmarks of DARE's table that have envs here (``--suite`` with no env ids)."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem from ``n`` samples of which ``c`` are correct:
    ``1 - C(n - c, k) / C(n, k)``, computed as a product so that large ``n`` neither overflows nor loses
    precision.

    >>> pass_at_k(10, 0, 1), pass_at_k(10, 10, 5), round(pass_at_k(10, 3, 1), 6)
    (0.0, 1.0, 0.3)
    >>> round(pass_at_k(4, 1, 2), 6)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    0.5
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"pass_at_k: {name} must be a non-negative integer, got {value!r}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k must be in [1, n={n}], got k={k}")
    if c > n:
        raise ValueError(f"pass_at_k: c={c} correct samples out of n={n}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(num_correct: Sequence[int], n: int, k: int) -> float:
    """pass@k averaged over problems (``num_correct[i]`` of ``n`` samples of problem ``i`` were correct)."""
    if not num_correct:
        return 0.0
    return sum(pass_at_k(n, c, k) for c in num_correct) / len(num_correct)


@dataclass
class BenchmarkSpec:
    """One row of the suite: an env id and its split (``"gsm8k-v0"`` or ``"gsm8k-v0:test"``)."""

    env: str
    split: str = "test"

    @classmethod
    def parse(cls, text: str, default_split: str = "test") -> "BenchmarkSpec":
        env, _, split = text.partition(":")
        return cls(env, split or default_split)

    @property
    def label(self) -> str:
        return self.env if self.split == "test" else f"{self.env}:{self.split}"


@dataclass
class SuiteConfig:
    """What a suite run does. ``ks`` are the pass@k values reported (each <= ``num_samples``); ``num_samples=0``
    skips sampling, ``greedy=False`` the greedy pass; ``limit`` records per env (None: the whole split, 500 for an
    unbounded procedural one); ``generation`` are sampler settings for both passes (their temperature is
    overridden: 0 greedy, ``sample_temperature`` sampled)."""

    benchmarks: list[BenchmarkSpec]
    policies: list[str]
    num_samples: int = 8
    ks: list[int] = field(default_factory=lambda: [1, 8])
    sample_temperature: float = 0.8
    greedy: bool = True
    limit: int | None = None
    seed: int = 0
    batch_size: int = 256
    generation: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.benchmarks or not self.policies:
            raise ValueError("a suite needs at least one benchmark and one policy")
        for what, names in (("policy", self.policies), ("benchmark", [b.label for b in self.benchmarks])):
            twice = sorted({name for name in names if names.count(name) > 1})
            if twice:
                raise ValueError(f"{what} {twice[0]!r} is given twice")
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {self.num_samples}")
        bad = [k for k in self.ks if not 1 <= k <= max(self.num_samples, 0)]
        if self.num_samples and bad:
            raise ValueError(f"every k must be in [1, samples={self.num_samples}], got {bad}")
        if not self.greedy and not self.num_samples:
            raise ValueError("nothing to do: greedy is off and samples is 0")
        if not self.sample_temperature > 0 and self.num_samples > 1:
            raise ValueError(f"sample_temperature must be > 0 for {self.num_samples} samples, got "
                             f"{self.sample_temperature}")


def metric_names(config: SuiteConfig) -> list[str]:
    """The metrics a suite reports, in table order."""
    names = ["greedy"] if config.greedy else []
    return names + ([f"pass@{k}" for k in sorted(set(config.ks))] if config.num_samples else [])


def score_benchmark(policy, env, config: SuiteConfig, *, progress: bool = False, label: str = "") -> dict:
    """One policy on one env: ``{"records", "greedy", "greedy_mean_reward", "pass@k"..., "per_record"}``."""
    from dare_gym.train.evaluation import record_indices, sample_and_score

    limit = config.limit if config.limit is not None else (None if env.num_records is not None else 500)
    indices = record_indices(env, limit)
    generation = {k: v for k, v in config.generation.items() if k != "temperature"}
    result: dict = {"records": len(indices)}
    per_record: dict = {"index": indices}
    if config.greedy:
        greedy = sample_and_score(policy, env, 1, indices=indices, batch_size=config.batch_size, seed=config.seed,
                                  progress=progress, desc=f"{label} greedy", temperature=0.0, **generation)
        result["greedy"] = sum(greedy.num_correct) / max(1, len(indices))
        result["greedy_mean_reward"] = sum(r[0] for r in greedy.rewards) / max(1, len(indices))
        per_record["greedy_correct"] = [row[0] for row in greedy.correct]
    if config.num_samples:
        sampled = sample_and_score(policy, env, config.num_samples, indices=indices, batch_size=config.batch_size,
                                   seed=config.seed, progress=progress, desc=f"{label} n={config.num_samples}",
                                   temperature=config.sample_temperature, **generation)
        for k in sorted(set(config.ks)):
            result[f"pass@{k}"] = mean_pass_at_k(sampled.num_correct, config.num_samples, k)
        result["sampled_mean_reward"] = (sum(map(sum, sampled.rewards)) / max(1, len(indices) * config.num_samples))
        per_record["num_correct"] = sampled.num_correct
    result["per_record"] = per_record
    return result


def run_suite(config: SuiteConfig, *, load_policy: Callable[[str], object], make_env: Callable[[BenchmarkSpec], object],
              progress: bool = False, log: Callable[[str], None] = lambda line: None) -> dict:
    """Score every policy on every benchmark. Policies are loaded one at a time (``load_policy(name)``) and
    dropped before the next; envs come from ``make_env(spec)``. Returns the JSON-ready report."""
    import gc

    envs = {spec.label: make_env(spec) for spec in config.benchmarks}  # bad env ids fail before any model loads
    results: dict[str, dict[str, dict]] = {}
    for name in config.policies:
        policy = load_policy(name)
        results[name] = {}
        for spec in config.benchmarks:
            log(f"{name} on {spec.label}")
            results[name][spec.label] = score_benchmark(policy, envs[spec.label], config, progress=progress,
                                                        label=spec.label)
        del policy
        gc.collect()
    settings = asdict(config)
    settings["benchmarks"] = [spec.label for spec in config.benchmarks]
    return {"config": settings, "metrics": metric_names(config), "results": results}


def markdown_tables(report: dict) -> str:
    """One Markdown table per metric: rows benchmarks, columns policies, cells percentages (one decimal)."""
    config = report["config"]
    policies, benchmarks = config["policies"], config["benchmarks"]
    sections = []
    for metric in report["metrics"]:
        if metric == "greedy":
            title = "greedy accuracy (temperature 0, one completion per problem)"
        else:
            title = (f"{metric} (unbiased estimator, n={config['num_samples']} samples at temperature "
                     f"{config['sample_temperature']:g})")
        header = "| benchmark | " + " | ".join(policies) + " |"
        rule = "|---|" + "---|" * len(policies)
        rows = []
        for bench in benchmarks:
            cells = [f"{100 * report['results'][p][bench][metric]:.1f}" for p in policies]
            records = report["results"][policies[0]][bench]["records"]
            rows.append(f"| {bench} ({records}) | " + " | ".join(cells) + " |")
        sections.append("\n".join([f"**{title}**", "", header, rule, *rows]))
    return "\n\n".join(sections) + "\n"


def write_report(report: dict, output_dir: str | Path) -> dict[str, Path]:
    """Write ``suite.json`` (everything, per-record counts included) and ``suite.md`` (the tables)."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"json": output / "suite.json", "markdown": output / "suite.md"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(markdown_tables(report))
    return paths


__all__ = ["BenchmarkSpec", "DEFAULT_SUITE", "SuiteConfig", "markdown_tables", "mean_pass_at_k", "metric_names",
           "pass_at_k", "run_suite", "score_benchmark", "write_report"]
