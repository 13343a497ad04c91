"""`dare-gym compare`: equal rollout budgets, one process per run, failures recorded, the report files.

One small comparison runs once for the module (d1 on 2 seeds, an out-of-tree algorithm that raises, imported
from a module in the current directory, and the SFT baseline); the other tests plan comparisons, compute
curves and draw plots without training.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from dare_gym.algorithms import ALGORITHMS, register_algorithm
from dare_gym.algorithms.base import AlgorithmConfig, PolicyGradient, GRPOConfig
from dare_gym.tools.cli import build_parser, default_config_path, main
from dare_gym.tools.compare import CSV_COLUMNS, filter_algorithm_options, learning_curve, mean_curve, plan_comparison
from dare_gym.tools.compare.report import algorithm_style, plot_curves
from dare_gym.core.config import ConfigError

COMPARE_DEFAULT = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "compare_default.yaml"

TINY = ["prompts_per_step=4", "group_size=4", "eval_size=16", "eval_every=1", "torch_threads=1"]
BUDGET = 40  # 2 steps of 16 rollouts; 8 rollouts left over

BROKEN_PLUGIN = '''
from dataclasses import dataclass

from dare_gym.algorithms.base import PolicyGradient, GRPOConfig, register_algorithm


@dataclass
class BrokenConfig(GRPOConfig):
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
    # The plugin is found in the current directory, not through PYTHONPATH, by the parent and by every run.
    process = run_compare(root, output)
    with (output / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return process, output, rows


def run_compare(root: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TQDM_DISABLE="1")
    env.pop("PYTHONPATH", None)
    command = [sys.executable, "-m", "dare_gym", "compare", "--algorithms", "d1", "broken_for_test",
               "--import", "compare_test_plugin", "--seeds", "0", "1", "--budget-rollouts", str(BUDGET),
               "--sft-baseline", "--output", str(output), "--threshold", "0.3", *TINY, *extra]
    process = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert process.returncode == 0, process.stdout + process.stderr
    return process


def test_resume_keeps_the_finished_runs_and_reruns_the_failed_ones(comparison):
    """The same comparison again with --resume: d1's and the SFT baseline's runs are kept (their records are
    unchanged), the failing algorithm's runs are run again; the report holds every run as before."""
    _, output, rows = comparison
    before = json.loads((output / "compare.json").read_text())
    resumed = run_compare(output.parent, output, "--resume")
    lines = [line for line in resumed.stdout.splitlines() if line.startswith("[")]
    kept = [line for line in lines if line.endswith("(kept from the earlier run)")]
    assert len(lines) == 6 and len(kept) == 4, resumed.stdout
    assert all("broken_for_test" not in line for line in kept)
    after = json.loads((output / "compare.json").read_text())
    for old, new in zip(before["runs"], after["runs"]):
        assert (old["algorithm"], old["seed"]) == (new["algorithm"], new["seed"])
        if old["algorithm"] != "broken_for_test":
            assert new["curve"] == old["curve"] and new["train_seconds"] == old["train_seconds"]


def test_resume_reruns_a_run_whose_spec_or_resolved_config_changed(comparison, tmp_path):
    """A kept run must have run exactly these settings: its spec.json, and the resolved algorithm section (its
    defaults included) that its config.json recorded; a changed default or option reruns it."""
    import shutil

    from dare_gym.tools.compare.run import finished_runs, reusable

    _, output, _ = comparison
    run_dir = tmp_path / "d1-seed0"
    shutil.copytree(output / "runs" / "d1-seed0", run_dir)
    spec = json.loads((run_dir / "spec.json").read_text())
    spec.pop("result_path")
    spec["config"]["output_dir"] = str(run_dir / "train")  # the copy's own paths
    (run_dir / "spec.json").write_text(json.dumps(spec))
    earlier = finished_runs(output)
    assert ("d1", 0) in earlier and ("broken_for_test", 0) not in earlier  # failed runs are never kept
    assert reusable(earlier, spec, run_dir)["curve"] == earlier[("d1", 0)]["curve"]
    changed = json.loads(json.dumps(spec))
    changed["config"]["learning_rate"] = 5e-5
    assert reusable(earlier, changed, run_dir) is None
    recorded = json.loads((run_dir / "train" / "config.json").read_text())
    recorded["algorithm"]["epsilon"] += 0.1  # as if d1's default had changed since the run
    (run_dir / "train" / "config.json").write_text(json.dumps(recorded))
    assert reusable(earlier, spec, run_dir) is None


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
            assert config["seed"] == run["seed"] and config["imports"] == ["compare_test_plugin"]


def test_training_seconds_leave_out_every_evaluation_and_start_at_zero(comparison):
    _, output, _ = comparison
    report = json.loads((output / "compare.json").read_text())
    for run in [r for r in report["runs"] if r["algorithm"] == "d1"]:
        records = [json.loads(line) for line in
                   (output / "runs" / f"d1-seed{run['seed']}" / "train" / "metrics.jsonl").read_text().splitlines()]
        assert all("time_eval" in r for r in records)  # eval_every=1: every record was evaluated
        seconds = [p["train_seconds"] for p in run["curve"]]
        assert seconds[0] == 0.0 and 0 < seconds[1] < seconds[2]
        # elapsed_s is taken before a record's own evaluation: only the evaluations before it are taken out
        assert seconds[2] == pytest.approx(records[2]["elapsed_s"] - records[0]["time_eval"] - records[1]["time_eval"],
                                           abs=1e-3)
        assert run["train_seconds"] == pytest.approx(seconds[-1], abs=1e-3)
        assert run["seconds_per_step"] == pytest.approx(seconds[-1] / 2, abs=1e-3)
        # the log of a run shows its progress lines (stdout is a file there)
        log = (output / "runs" / f"d1-seed{run['seed']}" / "log.txt").read_text()
        assert "step 2 | reward" in log


def test_learning_curve_takes_out_the_evaluations_before_each_point():
    records = [
        {"step": 0, "elapsed_s": 0.0, "heldout_accuracy": 0.4, "time_eval": 2.0},
        {"step": 1, "elapsed_s": 3.0},  # 1 s of training after the 2 s evaluation
        {"step": 2, "elapsed_s": 4.5, "heldout_accuracy": 0.5, "time_eval": 2.0},
        {"step": 3, "elapsed_s": 7.5, "heldout_accuracy": 0.6, "time_eval": 2.0},
    ]
    curve, train_seconds, eval_seconds = learning_curve(records, rollouts_per_step=16)
    assert [(p["step"], p["rollouts"], p["train_seconds"]) for p in curve] == [(0, 0, 0.0), (2, 32, 2.5), (3, 48, 3.5)]
    assert train_seconds == 3.5 and eval_seconds == 6.0


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
    class SharedConfig(GRPOConfig):
        pass

    class Toy(PolicyGradient):
        pass

    class Shared(PolicyGradient):
        pass

    @dataclass
    class NoKLConfig(GRPOConfig):
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
    assert kept == {"num_iterations": 2}
    assert dropped == ["beta", "epsilon", "estimator", "estimator_kwargs", "scale_rewards"]
    kept, dropped = filter_algorithm_options(shared, recipe)
    assert kept == {k: v for k, v in recipe.items() if k != "name"} and dropped == []

    plan = plan_comparison(["d1", minimal, shared], [0], 64, config_path=default_config_path(),
                           overrides=["prompts_per_step=4", "group_size=4", "algorithm.epsilon=0.3",
                                      "algorithm.temperature_bonus=0.5"], shared_recipe=True)
    assert plan.options[minimal] == {"name": minimal, "num_iterations": 2, "temperature_bonus": 0.5}
    assert plan.dropped[minimal] == ["beta", "drop_zero_variance_groups", "epsilon", "estimator", "estimator_kwargs",
                                     "scale_rewards"]
    assert plan.ignored_overrides[minimal] == ["algorithm.epsilon=0.3"]
    assert plan.ignored_overrides["d1"] == ["algorithm.temperature_bonus=0.5"]
    assert plan.options["d1"]["epsilon"] == 0.3 and plan.options[shared]["epsilon"] == 0.3
    notes = "\n".join(plan.notes)
    assert (f"{minimal}: dropped recipe option(s) beta, drop_zero_variance_groups, epsilon, estimator, "
            "estimator_kwargs, scale_rewards") in notes
    assert f"{minimal}: ignored override(s) algorithm.epsilon=0.3" in notes
    assert not plan.config_errors

    own = plan_comparison(["d1", shared], [0], 64, config_path=default_config_path(),
                          overrides=["prompts_per_step=4", "group_size=4"])
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
                           overrides=["prompts_per_step=4", "group_size=4", "algorithm.epsilon=0.3"],
                           shared_recipe=True)
    assert plan.options[nokl] == {"name": nokl, "epsilon": 0.3}  # the overrides still apply
    assert plan.options["d1"]["beta"] == 0.04 and not plan.config_errors
    assert any(f"{nokl}: rejects the shared recipe" in note and "beta must be 0" in note for note in plan.notes)


def test_a_new_algorithm_is_one_short_file_that_compare_picks_up():
    """algorithms/reinforce.py composes an existing estimator with a new loss; nothing else names it."""
    import subprocess
    from pathlib import Path

    from dare_gym.algorithms import list_algorithms
    from dare_gym.tools.compare import plan_comparison

    source = Path(__file__).resolve().parents[1] / "algorithms" / "reinforce.py"
    assert len(source.read_text().splitlines()) <= 40
    assert "reinforce" in list_algorithms()
    mentions = subprocess.run(["git", "grep", "-l", "Reinforce", "--", "*.py", ":!tests"], capture_output=True, text=True,
                              cwd=source.parents[1]).stdout.split()
    assert mentions == ["algorithms/reinforce.py"]
    plan = plan_comparison(["d1", "reinforce"], [0], 256, overrides=["eval_size=16"])
    assert plan.options["reinforce"]["name"] == "reinforce" and not plan.config_errors


def test_each_algorithm_runs_its_own_defaults_unless_asked_to_share():
    """The packaged default.yaml's tuned d1 recipe (beta 0.04, 2 iterations) is d1's, not REINFORCE's."""
    from dare_gym.algorithms import build_config

    plan = plan_comparison(["d1", "reinforce"], [0], 256)
    assert plan.options["d1"]["beta"] == 0.04 and plan.options["d1"]["num_iterations"] == 2
    assert plan.options["reinforce"] == {"name": "reinforce"}
    reinforce = build_config("reinforce", {})
    assert (reinforce.scale_rewards, reinforce.num_iterations) == ("group", 1)  # what that run trains with
    assert any("apply to d1 only" in note for note in plan.notes)
    shared = plan_comparison(["d1", "reinforce"], [0], 256, shared_recipe=True)
    assert shared.options["reinforce"]["estimator"] == "random_ratio" and shared.options["reinforce"]["num_iterations"] == 2
    assert "beta" not in shared.options["reinforce"]  # REINFORCE has no KL term: the preset's beta is dropped
    assert build_parser().parse_args(["compare", "--algorithms", "d1", "--budget-rollouts", "1",
                                      "--shared-recipe"]).shared_recipe is True
    assert build_parser().parse_args(["compare", "--algorithms", "d1", "--budget-rollouts", "1"]).shared_recipe is False


def test_the_comparison_config_gives_each_algorithm_its_own_options():
    plan = plan_comparison(["d1", "spg", "ppo", "reinforce"], [0], 256, config_path=COMPARE_DEFAULT)
    assert plan.options == {
        "d1": {"name": "d1", "num_iterations": 4}, "spg": {"name": "spg", "num_iterations": 1},
        "ppo": {"name": "ppo", "value_learning_rate": 1e-3, "normalize_advantages": True},
        "reinforce": {"name": "reinforce"},
    }


def _lab(color: str):
    """sRGB hex to CIELAB (D65)."""
    import numpy as np

    rgb = np.array([int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ linear
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_fifteen_algorithms_get_clearly_different_colours():
    import itertools

    import numpy as np

    styles = [algorithm_style(i) for i in range(15)]
    distances = [np.linalg.norm(_lab(a[0]) - _lab(b[0])) for a, b in itertools.combinations(styles, 2)]
    assert min(distances) >= 25  # tab20's blue / light blue are 17 apart
    assert len({algorithm_style(i) for i in range(40)}) == 40  # past the palette, the line style changes


def _run(name, seed, points):
    return {"algorithm": name, "seed": seed, "error": None,
            "curve": [{"step": s, "rollouts": 16 * s, "train_seconds": t, "heldout_accuracy": a} for s, t, a in points]}


def test_mean_line_and_band_end_together_at_the_last_evaluation_all_seeds_reached(tmp_path):
    runs = [_run("a", 0, [(0, 0.0, 0.4), (5, 2.0, 0.6), (10, 4.0, 0.8)]),
            _run("a", 1, [(0, 0.0, 0.4), (5, 3.0, 0.5)])]  # cut short
    x, mean, std, _ = mean_curve(runs, "train_seconds")
    assert x.tolist() == [0.0, 2.5] and mean.tolist() == pytest.approx([0.4, 0.55]) and len(std) == 2
    x, mean, _, _ = mean_curve(runs, "rollouts")
    assert x.tolist() == [0, 80]
    many = [_run(f"algo{i}", seed, [(0, 0.0, 0.4), (5, 2.0 + seed, 0.5 + i / 100)]) for i in range(15) for seed in (0, 1)]
    path = plot_curves(many + runs, tmp_path / "curves.png", title="digitsort-v0")
    assert path.stat().st_size > 20_000


def test_import_by_file_path_registers_for_the_plan_and_is_recorded_for_every_run(tmp_path):
    plugin = tmp_path / "plugins" / "compare_file_plugin.py"
    plugin.parent.mkdir()
    plugin.write_text(BROKEN_PLUGIN.replace("broken_for_test", "from_file_for_test"))
    try:
        plan = plan_comparison(["d1", "from_file_for_test"], [0], 64, imports=[str(plugin)],
                               overrides=["prompts_per_step=4", "group_size=4"])
        assert plan.shared["imports"] == [str(plugin)]
        assert plan.run_config("from_file_for_test", 0, tmp_path / "run")["imports"] == [str(plugin)]
    finally:
        ALGORITHMS.pop("from_file_for_test", None)
    with pytest.raises(ConfigError, match="--import nowhere/plugin.py: no such file"):
        plan_comparison(["d1"], [0], 64, imports=["nowhere/plugin.py"])


def test_compare_does_not_import_the_command_line():
    code = "import sys, dare_gym.tools.compare; assert 'dare_gym.tools.cli' not in sys.modules, 'compare imports cli'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_the_spread_over_seeds_is_the_sample_std():
    """± is the sample standard deviation (n − 1), as papers report it over seeds: for 0.4 and 0.6 it is
    sqrt(2 × 0.1² / 1) = 0.1414…, not the population std 0.1."""
    from dare_gym.tools.compare.report import summarize

    runs = [dict(_run("a", seed, [(0, 0.0, 0.3), (5, 2.0, final)]), final_heldout_accuracy=final,
                 initial_heldout_accuracy=0.3, step_to_threshold=None, seconds_per_step=1.0)
            for seed, final in ((0, 0.4), (1, 0.6))]
    [row] = summarize(runs, threshold=0.8)
    assert row["final_heldout_accuracy_std"] == pytest.approx(0.02 ** 0.5, rel=1e-12)
    _, _, band, _ = mean_curve(runs, "step")
    assert band.tolist() == pytest.approx([0.0, 0.02 ** 0.5], rel=1e-12)


def test_an_algorithm_that_refuses_the_policy_fails_only_its_runs_with_the_reason():
    """DiPO needs a block-causal policy: on the full-attention tiny one its runs are failed up front with the
    refusal's reason; on tiny-block it plans cleanly."""
    plan = plan_comparison(["d1", "dipo"], [0], 64, config_path=default_config_path(),
                           overrides=["prompts_per_step=4", "group_size=4"])
    assert set(plan.config_errors) == {"dipo"}
    assert "cannot train policy 'tiny'" in plan.config_errors["dipo"]
    assert "needs block-causal attention" in plan.config_errors["dipo"]
    block = plan_comparison(["dipo"], [0], 64, config_path=default_config_path(),
                            overrides=["prompts_per_step=4", "group_size=4", "policy=tiny-block", "env=groupsort-v0"])
    assert not block.config_errors
