"""Configurations that cannot run fail before anything is launched or loaded, in one line that names the bad
value and what to do instead."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import run_cli as run


@pytest.mark.parametrize("argv,message", [
    (["--nproc", "3", "prompts_per_step=8"],
     "dare-gym train: error: prompts_per_step=8 must be divisible by the number of processes (3): each rank rolls "
     "out whole groups"),
    (["rollout.options={cache: dual}"],
     "dare-gym train: error: rollout: option cache: not taken by the policy's own sampler 'llada' (rollout.sampler is "
     "not set); it is an option of fast_dllm: set rollout.sampler=fast_dllm"),
    (["evaluation.sampler=llada", "evaluation.options={threshold: 0.9}"],
     "dare-gym train: error: evaluation: option threshold: not taken by sampler 'llada'; it is an option of "
     "block_diffusion, fast_dllm: set evaluation.sampler=block_diffusion"),
    (["policy=tiny-block", "env=groupsort-v0", "rollout.sampler=llada"],
     "dare-gym train: error: rollout: the policy is block-causal (blocks of 4 tokens) and sampler 'llada' decodes it "
     "with the policy's defaults only if its block_length is a multiple of 4 dividing gen_length (gen_length=72 must "
     "be a multiple of block_length=32); its own sampler is block_diffusion: set rollout.sampler=block_diffusion or "
     "leave rollout.sampler unset"),
])
def test_train_refuses_before_launching_or_loading(tmp_path, argv, message):
    out = run("train", *argv, f"output_dir={tmp_path / 'run'}")
    assert out.returncode == 2
    assert out.stderr.strip() == message  # one line: no torchrun traceback, no rank repeating it
    assert "launching" not in out.stdout and "training" not in out.stdout  # before torchrun, before the model
    assert not (tmp_path / "run").exists()


def test_the_same_settings_run_with_the_sampler_they_belong_to(tmp_path):
    from dare_gym.core.config import load_config
    from dare_gym.train.config import TrainConfig, resolve

    for overrides in (["rollout.sampler=fast_dllm", "rollout.options={cache: dual}"],
                      ["policy=tiny-block", "env=groupsort-v0", "rollout.sampler=block_diffusion"],
                      ["policy=tiny-block", "env=groupsort-v0", "rollout.sampler=llada", "rollout.block_length=8",
                       "rollout.steps=72"]):  # a block_length the model's blocks divide: llada decodes it
        resolve(load_config(TrainConfig, None, overrides))


def test_serve_without_its_extra_says_which_to_install():
    # the interpreter cannot import uvicorn (sys.modules[name] = None makes `import name` raise ImportError)
    code = "import sys; sys.modules['uvicorn'] = None; from dare_gym.tools.cli import main; sys.exit(main(['serve']))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip() == ("dare-gym serve: error: dare-gym serve needs the serve extra (uvicorn not "
                                  "installed): pip install 'dare-gym[serve]'")
