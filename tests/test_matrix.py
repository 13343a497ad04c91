"""Every registered algorithm × every model family stand-in, from the command line, with the algorithm's own
defaults: one training step each, or a refusal up front with the reason; and the README's table is the one the
registries give.

The stand-ins: the built-in ``tiny`` (full attention) and ``tiny-block`` (block-causal, blocks of 4), LLaDA,
Dream, SDAR and LLaDA2 (MoE, block-causal) in their real formats at tiny sizes (``build_standin``), and
DiffusionGemma (uniform noise) written through transformers' config classes, rolled out with 2 denoising steps per
canvas so that its trajectory replays stay within seconds; algorithms that cannot train it are refused with their
reason. The env is digit sorting with a reward
that varies with the completion's characters (the parity of their codes; ``correct`` where it is 1), so that even a random
stand-in's groups carry a learning signal for every algorithm.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import pytest

from dare_gym.algorithms import get_algorithm, list_algorithms
from dare_gym.algorithms.base import resolved_section
from dare_gym.tools.cli import main, support_table
from dare_gym.core.loading import policy_config, policy_family
from dare_gym.models.families import FAMILIES, ModelFamily
from dare_gym.models.standin import build_standin
from dare_gym.train.user_code import import_module

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = '''
from dare_gym.envs.sorting import DigitSortEnv
from dare_gym.registry import register_env
from dare_gym.rewards import register_reward


def varied(completion, sample):
    return float(sum(map(ord, completion)) % 2)


register_reward("matrix_varied", varied)


class VariedDigitSort(DigitSortEnv):
    default_reward = "matrix_varied"

    def is_correct(self, completion, record):
        return varied(completion, record) == 1.0


register_env("matrix-digitsort-v0", f"{__name__}:VariedDigitSort")
'''
FULL_ATTENTION = ["rollout.block_length=8", "rollout.steps=8"]
STANDINS = {"tiny": ("tiny", FULL_ATTENTION), "tiny-block": ("tiny-block", []), "llada": (None, FULL_ATTENTION),
            "dream": (None, FULL_ATTENTION), "sdar": (None, []), "llada2": (None, []),
            "diffusion_gemma": (None, ["rollout.options={max_denoising_steps: 2}"])}


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    """The stand-ins' folders, with the plugin's env and reward registered for this module only (other test
    files list the registered envs and rewards)."""
    import gymnasium

    from dare_gym import registry
    from dare_gym.rewards import base as reward_registry

    saved = (dict(registry._REGISTERED), dict(reward_registry.REWARDS), dict(gymnasium.registry))
    root = tmp_path_factory.mktemp("matrix")
    (root / "matrix_plugin.py").write_text(PLUGIN)
    import_module(str(root / "matrix_plugin.py"))
    yield {name: (folder or str(build_standin(name, root / name)), extra) for name, (folder, extra) in STANDINS.items()}
    for live, before in zip((registry._REGISTERED, reward_registry.REWARDS, gymnasium.registry), saved):
        live.clear()
        live.update(before)


def train(args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(["train", *args])
    return code, out.getvalue()


@pytest.mark.parametrize("family", list(STANDINS))
@pytest.mark.parametrize("algorithm", list_algorithms())
def test_every_algorithm_trains_one_step_on_every_family_with_its_own_defaults(policies, algorithm, family, tmp_path):
    folder, extra = policies[family]
    code, printed = train([f"policy={folder}", f"algorithm.name={algorithm}", "env=matrix-digitsort-v0",
                           "max_steps=1", "prompts_per_step=2", "group_size=4", "eval_size=0", "progress=false",
                           "time_limit_minutes=null", "rollout.gen_length=8", "rollout.temperature=1.0",
                           f"output_dir={tmp_path}", *extra])
    reason = get_algorithm(algorithm).algorithm_class.model_refusal(policy_family(folder), policy_config(folder))
    if reason is not None:  # refused before anything loads, with the reason the README's table shows
        assert code == 2 and reason in printed and not (tmp_path / "config.json").exists(), printed
        return
    assert code == 0, printed
    saved = json.loads((tmp_path / "config.json").read_text())["algorithm"]
    assert saved == resolved_section(algorithm, {})  # every field the command did not set: the defaults
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    record = records[-1]
    assert [r["step"] for r in records] == [0, 1], records
    if algorithm == "tracerl" and record["truncated_fraction"] == 1.0:
        # a random stand-in never ends its completions: TraceRL counts them wrong and filters every group
        assert record["rows_trained"] == 0
        return
    assert record["rows_trained"] > 0 and math.isfinite(record["loss"]), record
    assert math.isfinite(record["grad_norm"])


def test_a_family_an_algorithm_cannot_train_is_refused_before_loading(tmp_path, monkeypatch):
    """A family whose models undo uniform (not [MASK]) noise: an algorithm that estimates only by masking refuses it
    with that reason, before a weight is read (the folder holds only a config.json, so a later refusal would have
    failed on the missing weights instead), and the table shows the refusal; d1, with a uniform-noise estimator,
    trains it."""
    monkeypatch.setitem(FAMILIES, "uniform_test", ModelFamily("uniform_test", ("uniform_test",), noise="uniform"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "uniform_test"}))
    for algorithm in ("spg", "dpo"):
        code, printed = train([f"policy={tmp_path / 'model'}", f"algorithm.name={algorithm}",
                               f"output_dir={tmp_path / 'run'}"])
        assert code == 2, printed
        assert (f"algorithm {algorithm} cannot train policy" in printed and "[MASK]" in printed
                and "uniform_test models are trained to undo uniform noise" in printed), printed
    assert not (tmp_path / "run").exists()
    table = support_table(["spg", "d1"])
    assert "| `spg` | ✓ | ✓ | ✓ | ✓ | ✓ | ✗ (1) | ✗ (2) |" in table and "| `d1` | ✓ | ✓ | ✓ | ✓ | ✓ | ✓ | ✓ |" in table
    assert "(2) its likelihood estimators replace tokens with [MASK]" in table and "uniform_test models are" in table


def test_the_readme_table_is_the_one_the_registries_give():
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- algorithm-family table[^>]*-->\n(.*?)\n<!-- end of table -->", readme, re.S)
    assert match, "README.md lacks the generated algorithm × family table"
    assert match.group(1).strip() == support_table().strip(), "regenerate it: dare-gym algorithms --table"
