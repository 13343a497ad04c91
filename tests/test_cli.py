"""The dare-gym command line, run as a user would, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_cli as run


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "dare-gym"
    assert script.exists(), "pip install -e . should install the dare-gym console script"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "train" in out.stdout


@pytest.mark.parametrize("command", ["train", "eval", "envs", "algorithms", "standin", "compare"])
def test_every_subcommand_has_help(command):
    out = run(command, "--help")
    assert out.returncode == 0 and out.stdout.startswith(f"usage: dare-gym {command}")


def test_envs_and_algorithms_list_what_is_registered():
    envs = run("envs").stdout
    assert "digitsort-v0" in envs and "gsm8k-v0" in envs
    algorithms = run("algorithms").stdout
    d1 = algorithms[algorithms.index("\nd1: "):algorithms.index("\ndpo: ")]
    assert "diffu-GRPO" in d1 and "epsilon=0.5" in d1 and "num_iterations=12" in d1
    assert "optimizer updates per batch of rollouts" in d1  # each field with its doc line
    ppo = run("algorithms", "ppo").stdout
    assert "gamma=1.0" in ppo and "discount over denoising steps" in ppo and "d1:" not in ppo


def test_train_help_lists_every_config_field_with_its_doc():
    from dare_gym.core.config import field_docs
    from dare_gym.train.trainer import GenerationConfig, TrainConfig

    text = run("train", "--help").stdout
    for name, doc in field_docs(TrainConfig).items():
        assert doc, f"TrainConfig.{name} has no doc line"
        assert f"  {name}" in text and doc in text, name
    for name, doc in field_docs(GenerationConfig).items():
        assert doc and f"rollout.{name}=" in text and doc in text, name
    assert "lora.r=8" in text and "algorithm.<field>" in text
    # the steps and the time guard the help and the README promise are the default run's
    steps, minutes = TrainConfig().max_steps, TrainConfig().time_limit_minutes
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert f"the embedded default, {steps} steps" in " ".join(run("--help").stdout.split())
    assert f"{steps} steps" in readme and f"{minutes:g}-minute guard" in readme
    assert f"{minutes:g}-minute guard" in " ".join(text.split())


@pytest.mark.parametrize("argv,message", [
    (["--policy", "/no/such/policy"], "--policy: no policy folder '/no/such/policy' (give a built-in policy (tiny, tiny-long, tiny-block, tiny-gemma, tiny-moe), a checkpoint"),
    (["--policy", "experiments/no_such_policy"], "--policy: no policy folder 'experiments/no_such_policy'"),
    (["--policy", "tinyy"], "--policy: no policy folder 'tinyy'"),
    (["--env", "sudoku-v9"], "--env: unknown env 'sudoku-v9'; registered: countdown-v0, digitsort-v0"),
    (["--gen", "steps=abc"], "--gen.steps: expected an integer, got 'abc'"),
    (["--gen", "stepz=4"], "unknown config field(s) --gen.stepz; valid fields of --gen: block_length, gen_length"),
    (["--gen", "remasking=best"], "remasking must be one of low_confidence, random or null, got 'best'"),
    (["--gen", "steps"], "--gen: override 'steps' must look like field.path=value"),
    (["--split", "validation"], "--env digitsort-v0 --split validation: split must be one of"),
    (["--env-kwarg", "colour=1"], "--env-kwarg: digitsort-v0 has no argument 'colour'; its arguments: "),
    (["--env-kwarg", "reward=no_such_module_x:fn"], "no module named 'no_such_module_x'"),
    (["--import", "no_such_module_y"], "--import no_such_module_y: no module named 'no_such_module_y'"),
])
def test_eval_errors_are_one_line_naming_the_bad_value(argv, message, capsys):
    from dare_gym.tools.cli import main

    assert main(["eval", "--limit", "2", *argv]) == 2
    captured = capsys.readouterr()
    error = captured.err.strip()
    assert error.startswith("dare-gym eval: error: ") and "\n" not in error and "Traceback" not in error
    assert message in error and captured.out == ""


def test_eval_scores_the_tiny_policy(tmp_path):
    out = run("eval", "--limit", "40", "--output", str(tmp_path / "eval.json"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["records"] == 40 and 0.0 <= report["accuracy"] <= 1.0
    # every setting the sampler ran with, the policy's defaults included (no --gen was given)
    import dare_gym

    policy = dare_gym.load_policy("tiny")
    generation = report["generation"]
    assert generation["sampler"] == "llada" and generation["temperature"] == 0.0
    for key in ("gen_length", "steps", "block_length"):
        assert generation[key] == policy.generation_defaults[key], key
    assert len(json.loads((tmp_path / "eval.json").read_text())["completions"]) == 40


def test_train_rejects_a_bad_override_naming_it():
    out = run("train", "algorithm.beta=lots")
    assert out.returncode == 2 and "algorithm.beta: expected a number, got 'lots'" in out.stderr


def test_train_runs_and_prints_before_and_after(tmp_path):
    out = run("train", f"output_dir={tmp_path / 'run'}", "max_steps=2", "eval_size=32", "eval_every=2",
              "prompts_per_step=4", "log_every=5")
    assert out.returncode == 0, out.stderr
    assert "held-out greedy accuracy: before" in out.stdout
    # not a terminal: plain progress lines, at the first step and at the last (log_every=5)
    lines = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == ["step 0", "step 1", "step 2"]
    assert "reward" in lines[1] and "s/step" in lines[1] and "held-out acc" in lines[2] and "left" in lines[2]
    assert "Warning" not in out.stderr and "warnings.warn" not in out.stderr
    assert (tmp_path / "run" / "curves.png").exists()
    resumed = run("train", "--resume", f"output_dir={tmp_path / 'run'}", "max_steps=3", "eval_size=32",
                  "eval_every=2", "prompts_per_step=4")
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]


REWARDS_MODULE = """
def quarter(completion, sample):
    return 0.25


def fails(completion, sample):
    raise ValueError("no <answer> tag")
"""

PLUGIN_FILE = """
from dare_gym.rewards import register_reward


@register_reward("half_for_test")
def half(completion, sample):
    return 0.5
"""


def test_train_with_rewards_from_a_module_and_a_file_then_resume_from_the_saved_config(tmp_path):
    """`module:function` reward specs (found in the current directory) inside a weighted list, a reward
    registered by a .py file given to --import; --resume re-creates both from the run's config.json."""
    (tmp_path / "my_rewards.py").write_text(REWARDS_MODULE)
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "register_half.py").write_text(PLUGIN_FILE)
    tiny = ["prompts_per_step=2", "group_size=2", "eval_size=4", "eval_every=1", "output_dir=run"]
    out = run("train", "--import", "plugins/register_half.py", "max_steps=1", *tiny,
              "env_kwargs.reward=[[my_rewards:quarter, 1.0], [half_for_test, 2.0], [my_rewards:fails, 1.0]]",
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["reward_mean"] == pytest.approx(0.25 + 2 * 0.5)  # the user's rewards scored the rollouts
    # the reward failing on every rollout is reported on the console with one reason
    assert "warning: reward 'fails' failed on 4 of 4 rollouts at step 1" in out.stdout
    assert "ValueError: no <answer> tag" in out.stdout
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["imports"] == [str(tmp_path / "plugins" / "register_half.py")]
    # the module found in the current directory is saved as its file, so a resume from elsewhere finds it
    module = str(tmp_path / "my_rewards.py")
    assert saved["env_kwargs"]["reward"] == [[f"{module}:quarter", 1.0], ["half_for_test", 2.0],
                                             [f"{module}:fails", 1.0]]
    (tmp_path / "elsewhere").mkdir()
    resumed = run("train", "--resume", f"output_dir={tmp_path / 'run'}", "max_steps=3", "log_every=1", "eval_every=5",
                  cwd=tmp_path / "elsewhere")  # no --import, no reward, another folder
    assert resumed.returncode == 0, resumed.stderr
    assert "run/config.json (the run's saved config)" in resumed.stdout
    # the console shows the held-out value of the run's last evaluation (step 1), not its first (step 0)
    [line] = [line for line in resumed.stdout.splitlines() if line.startswith("step 2 |")]
    assert "held-out acc" in line and "(step 1)" in line
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3] and records[2]["reward_mean"] == pytest.approx(1.25)


def test_train_names_a_reward_reference_that_does_not_import(tmp_path):
    (tmp_path / "my_rewards.py").write_text(REWARDS_MODULE)
    out = run("train", "env_kwargs.reward=my_rewards:quater", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == ("dare-gym train: error: env_kwargs.reward: module 'my_rewards' has no attribute "
                                  "'quater'; its functions: fails, quarter")
