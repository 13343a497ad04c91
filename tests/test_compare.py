"""`dare-gym compare`: equal rollout budgets, one process per run, failures recorded, the report files.

One small comparison runs once for the module (d1 on 2 seeds, an out-of-tree algorithm that raises, and the
SFT baseline); the other tests plan comparisons without training.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from dare_gym.algorithms import ALGORITHMS, register_algorithm
from dare_gym.algorithms.base import AlgorithmConfig, PolicyGradient, PolicyGradientConfig
from dare_gym.cli import build_parser, default_config_path, main
from dare_gym.compare import CSV_COLUMNS, filter_algorithm_options, plan_comparison
from dare_gym.config import ConfigError

TINY = ["prompts_per_step=4", "group_size=4", "eval_size=16", "eval_every=1", "torch_threads=1"]
BUDGET = 40  # 2 steps of 16 rollouts; 8 rollouts left over

BROKEN_PLUGIN = '''
from dataclasses import dataclass

from dare_gym.algorithms.base import PolicyGradient, PolicyGradientConfig, register_algorithm


@dataclass
class BrokenConfig(PolicyGradientConfig):
    pass


@register_algorithm("broken_for_test", BrokenConfig)
class Broken(PolicyGradient):
    def advantages(self, buffer, group_size):
        raise RuntimeError("deliberate failure in advantages")
'''


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    (root / "compare_test_plugin.py").write_text(BROKEN_PLUGIN)
    output = root / "out"
    env = dict(os.environ, TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "dare_gym.cli", "compare", "--algorithms", "d1", "broken_for_test",
               "--import", "compare_test_plugin", "--seeds", "0", "1", "--budget-rollouts", str(BUDGET),
               "--sft-baseline", "--output", str(output), "--threshold", "0.3", *TINY]
    process = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert process.returncode == 0, process.stdout + process.stderr
    with (output / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return process, output, rows


def test_results_csv_has_a_row_per_run_with_the_columns(comparison):
    _, output, rows = comparison
    with (output / "results.csv").open() as handle:
        assert next(csv.reader(handle)) == CSV_COLUMNS
    assert [(r["algorithm"], r["seed"]) for r in rows] == [
        ("d1", "0"), ("broken_for_test", "0"), ("sft-baseline", "0"),
        ("d1", "1"), ("broken_for_test", "1"), ("sft-baseline", "1"),
    ]


def test_rl_runs_get_equal_rollout_budgets_and_report_memory_and_time(comparison):
    _, output, rows = comparison
    d1 = [r for r in rows if r["algorithm"] == "d1"]
    assert all(r["error"] == "" for r in d1)
    assert {r["rollouts"] for r in d1} == {"32"} and {r["steps"] for r in d1} == {"2"}
    for row in d1:
        assert 0.0 <= float(row["final_heldout_accuracy"]) <= 1.0
        assert float(row["peak_memory_mb"]) > 50  # torch alone is more than that
        assert float(row["seconds_per_step"]) > 0 and float(row["total_seconds"]) >= float(row["train_seconds"])
        if row["step_to_threshold"]:
            assert int(row["rollouts_to_threshold"]) == 16 * int(row["step_to_threshold"])
    report = json.loads((output / "compare.json").read_text())
    assert report["settings"]["max_steps"] == 2 and report["settings"]["rollouts_per_step"] == 16
    for run in report["runs"]:
        if run["algorithm"] == "d1":
            assert [p["rollouts"] for p in run["curve"]] == [0, 16, 32]
            config = json.loads((output / "runs" / f"d1-seed{run['seed']}" / "spec.json").read_text())["config"]
            assert config["max_steps"] == 2 and config["time_limit_minutes"] is None
            assert config["seed"] == run["seed"]


def test_a_failing_algorithm_is_recorded_and_the_others_complete(comparison):
    process, output, rows = comparison
    broken = [r for r in rows if r["algorithm"] == "broken_for_test"]
    assert len(broken) == 2
    for row in broken:
        assert "RuntimeError: deliberate failure in advantages" in row["error"]
        assert row["final_heldout_accuracy"] == "" and row["steps"] == "0"
        assert float(row["peak_memory_mb"]) > 0  # measured for the failed process too
    assert "FAILED" in process.stdout and "deliberate failure" in (output / "summary.md").read_text()
    assert "deliberate failure" in (output / "runs" / "broken_for_test-seed0" / "log.txt").read_text()


def test_sft_baseline_matches_the_rl_wall_time(comparison):
    _, output, rows = comparison
    report = json.loads((output / "compare.json").read_text())
    for seed in (0, 1):
        rl = [r for r in report["runs"] if r["algorithm"] == "d1" and r["seed"] == seed][0]
        sft = [r for r in report["runs"] if r["algorithm"] == "sft-baseline" and r["seed"] == seed][0]
        assert sft["error"] is None, sft["error"]
        assert sft["seconds_budget"] == pytest.approx(rl["train_seconds"])  # the only successful RL run
        assert sft["steps"] >= 1 and sft["curve"][0]["step"] == 0 and sft["curve"][-1]["step"] == sft["steps"]
        assert sft["rollouts"] is None


def test_summary_table_plot_and_printed_table(comparison):
    process, output, _ = comparison
    summary = (output / "summary.md").read_text()
    assert "| algorithm | runs ok |" in summary
    assert "| d1 | 2/2 |" in summary and "| broken_for_test | 0/2 |" in summary
    assert "continued SFT on gold" in summary
    assert "| d1 | 2/2 |" in process.stdout  # the table is printed at the end
    assert "8 rollouts of the budget are left unused" in summary
    assert (output / "curves.png").stat().st_size > 20_000


def test_compare_help():
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["compare", "--help"])
    assert exit_info.value.code == 0


def test_compare_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: dare-gym compare")
    for option in ("--algorithms", "--seeds", "--budget-rollouts", "--sft-baseline", "--threshold", "--output"):
        assert option in text


def test_unknown_algorithm_is_a_clear_error(tmp_path, capsys):
    code = main(["compare", "--algorithms", "d1", "no_such_algo", "--seeds", "0", "--budget-rollouts", "64",
                 "--output", str(tmp_path / "out")])
    assert code == 2
    error = capsys.readouterr().err
    assert "unknown algorithm 'no_such_algo'" in error and "registered:" in error and "d1" in error
    assert not (tmp_path / "out").exists()


def test_plan_sets_equal_budgets_and_rejects_what_the_comparison_owns():
    plan = plan_comparison(["d1"], [0, 1], 100, config_path=default_config_path(),
                           overrides=["prompts_per_step=4", "group_size=4", "algorithm.beta=0"])
    assert plan.max_steps == 6 and plan.rollouts_per_step == 16
    config = plan.run_config("d1", 1, "/tmp/x")
    assert config["max_steps"] == 6 and config["time_limit_minutes"] is None and config["seed"] == 1
    assert config["algorithm"]["beta"] == 0 and config["algorithm"]["estimator"] == "random_ratio"
    for bad in ("max_steps=3", "seed=4", "algorithm.name=d1", "output_dir=x", "time_limit_minutes=1"):
        with pytest.raises(ConfigError, match="set by the comparison"):
            plan_comparison(["d1"], [0], 100, overrides=[bad])
    with pytest.raises(ConfigError, match="match no field"):
        plan_comparison(["d1"], [0], 256, overrides=["algorithm.betta=0"])
    with pytest.raises(ConfigError, match="less than one step"):
        plan_comparison(["d1"], [0], 100)  # 32 x 8 rollouts per step in default.yaml


@pytest.fixture
def toy_algorithms():
    @dataclass
    class MinimalConfig(AlgorithmConfig):
        temperature_bonus: float = 0.0

    @dataclass
    class SharedConfig(PolicyGradientConfig):
        pass

    class Toy(PolicyGradient):
        pass

    class Shared(PolicyGradient):
        pass

    @dataclass
    class NoKLConfig(PolicyGradientConfig):
        def __post_init__(self):
            super().__post_init__()
            if self.beta != 0:
                raise ValueError(f"this algorithm has no KL term: beta must be 0, got {self.beta}")

    class NoKL(PolicyGradient):
        pass

    register_algorithm("toy_minimal_for_test", MinimalConfig)(Toy)
    register_algorithm("toy_shared_for_test", SharedConfig)(Shared)
    register_algorithm("toy_nokl_for_test", NoKLConfig)(NoKL)
    yield "toy_minimal_for_test", "toy_shared_for_test", "toy_nokl_for_test"
    for name in ("toy_minimal_for_test", "toy_shared_for_test", "toy_nokl_for_test"):
        ALGORITHMS.pop(name, None)


def test_option_filtering_drops_what_the_config_lacks(toy_algorithms):
    minimal, shared, _ = toy_algorithms
    recipe = {"name": "d1", "estimator": "random_ratio", "estimator_kwargs": {"t_min": 0.1}, "num_iterations": 2,
              "epsilon": 0.2, "beta": 0.04, "scale_rewards": "group"}
    kept, dropped = filter_algorithm_options(minimal, recipe)
    assert kept == {"num_iterations": 2, "beta": 0.04}
    assert dropped == ["epsilon", "estimator", "estimator_kwargs", "scale_rewards"]
    kept, dropped = filter_algorithm_options(shared, recipe)
    assert kept == {k: v for k, v in recipe.items() if k != "name"} and dropped == []

    plan = plan_comparison(["d1", minimal, shared], [0], 64, config_path=default_config_path(),
                           overrides=["prompts_per_step=4", "group_size=4", "algorithm.epsilon=0.3",
                                      "algorithm.temperature_bonus=0.5"])
    assert plan.options[minimal] == {"name": minimal, "num_iterations": 2, "beta": 0.04, "temperature_bonus": 0.5}
    assert plan.dropped[minimal] == ["epsilon", "estimator", "estimator_kwargs", "scale_rewards"]
    assert plan.ignored_overrides[minimal] == ["algorithm.epsilon=0.3"]
    assert plan.ignored_overrides["d1"] == ["algorithm.temperature_bonus=0.5"]
    assert plan.options["d1"]["epsilon"] == 0.3 and plan.options[shared]["epsilon"] == 0.3
    notes = "\n".join(plan.notes)
    assert f"{minimal}: dropped recipe option(s) epsilon, estimator, estimator_kwargs, scale_rewards" in notes
    assert f"{minimal}: ignored override(s) algorithm.epsilon=0.3" in notes
    assert not plan.config_errors

    own = plan_comparison(["d1", shared], [0], 64, config_path=default_config_path(),
                          overrides=["prompts_per_step=4", "group_size=4"], shared_recipe=False)
    assert own.options[shared] == {"name": shared} and own.options["d1"]["estimator"] == "random_ratio"


def test_an_invalid_config_for_one_algorithm_fails_only_its_runs(toy_algorithms):
    minimal, _, _ = toy_algorithms
    plan = plan_comparison(["d1", minimal], [0], 64, config_path=default_config_path(),
                           overrides=["prompts_per_step=4", "group_size=4", "algorithm.temperature_bonus=oops"])
    assert set(plan.config_errors) == {minimal}
    assert "algorithm.temperature_bonus: expected a number" in plan.config_errors[minimal]


def test_an_algorithm_that_rejects_the_shared_recipe_runs_at_its_own_defaults(toy_algorithms):
    _, _, nokl = toy_algorithms
    plan = plan_comparison(["d1", nokl], [0], 64, config_path=default_config_path(),
                           overrides=["prompts_per_step=4", "group_size=4", "algorithm.epsilon=0.3"])
    assert plan.options[nokl] == {"name": nokl, "epsilon": 0.3}  # the overrides still apply
    assert plan.options["d1"]["beta"] == 0.04 and not plan.config_errors
    assert any(f"{nokl}: rejects the shared recipe" in note and "beta must be 0" in note for note in plan.notes)


def test_a_new_algorithm_is_one_short_file_that_compare_picks_up():
    """algorithms/reinforce.py composes an existing estimator with a new loss; nothing else names it."""
    import subprocess
    from pathlib import Path

    from dare_gym.algorithms import list_algorithms
    from dare_gym.compare import plan_comparison

    source = Path(__file__).resolve().parents[1] / "algorithms" / "reinforce.py"
    assert len(source.read_text().splitlines()) <= 40
    assert "reinforce" in list_algorithms()
    mentions = subprocess.run(["git", "grep", "-l", "Reinforce", "--", "*.py", ":!tests"], capture_output=True, text=True,
                              cwd=source.parents[1]).stdout.split()
    assert mentions == ["algorithms/reinforce.py"]
    plan = plan_comparison(["d1", "reinforce"], [0], 256, overrides=["eval_size=16"])
    assert plan.options["reinforce"]["name"] == "reinforce" and not plan.config_errors
