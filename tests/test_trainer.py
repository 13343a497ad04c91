"""Buffer, the d1 algorithm's update machinery, the trainer loop, checkpoints and resume, config errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import dare_gym
from dare_gym.algorithms import build_config, make_algorithm
from dare_gym.core.buffer import RolloutBuffer
from dare_gym.core.config import ConfigError, load_config
from dare_gym.core.policy import Completion
from dare_gym.train.trainer import TrainConfig, Trainer, mean_completion_length, resolve


def rollouts(policy, group_size=4, groups=2, temperature=1.0, seed=0):
    env = dare_gym.make_vec("digitsort-v0", num_envs=group_size * groups, group_size=group_size)
    prompts, infos = env.reset(seed=seed)
    completions = policy.generate(list(prompts), temperature=temperature, seed=seed)
    _, rewards, _, _, _ = env.step([c.text for c in completions])
    return RolloutBuffer.from_rollouts(
        prompts, completions, rewards.tolist(), infos["group_id"].tolist(),
        completion_mask_fn=policy.completion_mask, pad_token_id=policy.tokenizer.pad_token_id,
    )


def test_mean_completion_length_counts_scored_tokens_of_completions_of_any_length(tiny_policy):
    eos = tiny_policy.stop_token_ids[0]

    def completion(ids):
        return Completion(text="", prompt_ids=torch.tensor([5]), completion_ids=torch.tensor(ids),
                          unmask_step=torch.zeros(len(ids), dtype=torch.long))

    # no stop token: all 3; up to and including the stop: 2 of 5; one token: 1
    assert mean_completion_length(tiny_policy, [completion([5, 6, 7]), completion([5, eos, 7, 8, 9]),
                                                completion([5])]) == 2.0


def test_buffer_columns_groups_and_model_inputs(tiny_policy):
    buffer = rollouts(tiny_policy)
    assert len(buffer) == 8 and buffer.completion_ids.shape == (8, 8)
    assert [g.tolist() for g in buffer.groups()] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    inputs = buffer.model_inputs()
    for row in range(8):
        prompt = tiny_policy.tokenizer.decode(inputs.prompt_ids[row][inputs.prompt_attention[row].bool()])
        assert prompt == buffer.prompts[row]
        assert tiny_policy.decode(inputs.completion_ids[row]) == buffer.completions[row]
    # The loss mask runs up to and including the first EOS.
    eos = tiny_policy.tokenizer.eos_token_id
    for row in range(8):
        ids = buffer.completion_ids[row].tolist()
        stop = ids.index(eos) + 1 if eos in ids else len(ids)
        assert buffer.completion_mask[row].tolist() == [1] * stop + [0] * (len(ids) - stop)
    picked = buffer.select(torch.tensor([False, True] * 4))
    assert picked.prompts == buffer.prompts[1::2] and torch.equal(picked.reward, buffer.reward[1::2])
    seen = sorted(i for mb in buffer.minibatches(3, generator=torch.Generator().manual_seed(0)) for i in mb.completions)
    assert seen == sorted(buffer.completions)


def test_d1_prepare_scores_old_and_reference_on_each_iterations_noise(tiny_policy):
    config = build_config("d1", {"num_iterations": 3, "beta": 0.04, "estimator": "d1",
                                 "drop_zero_variance_groups": True})
    algorithm = make_algorithm("d1", config, mask_token_id=tiny_policy.mask_token_id)
    buffer = rollouts(tiny_policy)
    buffer.reward = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    buffer = algorithm.advantages(buffer, 4)
    assert len(buffer) == 4  # the second group scored uniformly and was dropped (d1 itself keeps it)
    assert buffer.advantage.tolist() == [0.75, -0.25, -0.25, -0.25]  # d1: r - mean, no std scaling
    algorithm.prepare(tiny_policy, tiny_policy, buffer, torch.Generator().manual_seed(0))
    masks = buffer.columns["noise.prompt_masked"]
    assert masks.shape[:2] == (4, 3) and not torch.equal(masks[:, 0], masks[:, 1])
    # The reference is the policy itself here, so both columns equal a direct re-scoring on the same noise;
    # π_old is scored on iterations 1 and 2 only (iteration 0's is π_θ detached: no optimizer step precedes it).
    inputs = buffer.model_inputs()
    assert buffer.columns["old_logp"].shape[1] == 2 and buffer.columns["ref_logp"].shape[1] == 3
    for k in range(3):
        again = algorithm.estimator.token_logp(tiny_policy.logits, inputs, {"prompt_masked": masks[:, k]}).logp
        if k > 0:
            assert torch.allclose(buffer.columns["old_logp"][:, k - 1], again, atol=1e-5)
        assert torch.allclose(buffer.columns["ref_logp"][:, k], again, atol=1e-5)
    loss, metrics = algorithm.loss(tiny_policy, buffer, iteration=1)
    # On-policy with π_ref = π_θ: every ratio is 1 and the KL is 0, so the loss is −(token-mean of A).
    weights = buffer.completion_mask.float()
    expected = -(buffer.advantage[:, None] * weights).sum() / weights.sum()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert metrics["kl_ref"] == pytest.approx(0.0, abs=1e-6) and metrics["clip_fraction"] == 0.0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_policy.model.parameters())
    tiny_policy.model.zero_grad(set_to_none=True)


def test_prepare_scores_pi_old_only_where_an_optimizer_step_came_before(tiny_policy):
    """Iteration 0 of the default plan is one optimizer step over the whole batch, so π_old there is π_θ itself:
    prepare runs π_old's forward on iterations 1..μ−1 only (π_ref on all μ), and iteration 0's loss is the
    on-policy one (every ratio 1), with the gradient of −A plus the KL's."""
    import copy

    config = build_config("d1", {"num_iterations": 3, "beta": 0.04, "estimator": "d1"})
    algorithm = make_algorithm("d1", config, mask_token_id=tiny_policy.mask_token_id)
    buffer = algorithm.advantages(rollouts(tiny_policy), 4)
    calls = {"policy": 0, "reference": 0}

    def counted(name):
        wrapped = copy.copy(tiny_policy)

        def logits(*args, **kwargs):
            calls[name] += 1
            return tiny_policy.logits(*args, **kwargs)
        wrapped.logits = logits
        return wrapped

    algorithm.prepare(counted("policy"), counted("reference"), buffer, torch.Generator().manual_seed(0),
                      micro_batch_size=3)  # 8 rows: chunks of 3, 3, 2
    assert calls == {"policy": 2 * 3, "reference": 3 * 3}
    loss, metrics = algorithm.loss(tiny_policy, buffer, iteration=0)
    weights = buffer.completion_mask.float()
    assert loss.item() == pytest.approx(-(buffer.advantage[:, None] * weights).sum().item() / weights.sum().item(),
                                        abs=1e-5)
    assert metrics["clip_fraction"] == 0.0


def small_config(tmp_path, **overrides) -> TrainConfig:
    options = dict(
        output_dir=str(tmp_path / "run"), prompts_per_step=4, group_size=4, max_steps=4, eval_every=2,
        eval_size=24, save_every=2, progress=False,
        algorithm={"name": "d1", "estimator": "random_ratio", "estimator_kwargs": {"t_min": 0.1},
                   "num_iterations": 2, "epsilon": 0.2, "beta": 0.04, "scale_rewards": "group"},
    )
    options.update(overrides)
    return load_config(TrainConfig, None, [f"{k}={json.dumps(v)}" for k, v in options.items()])


def test_training_writes_metrics_plot_and_atomic_checkpoints(tmp_path, capsys):
    summary = Trainer(small_config(tmp_path, progress=True, log_every=2)).train()
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    # each evaluation is timed, so that its time can be told apart from training time
    assert [r["step"] for r in records if "time_eval" in r] == [0, 2, 4] and records[0]["time_eval"] > 0
    # the output is not a terminal here: a plain line at the first step, every log_every steps and the last
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == ["step 0", "step 1", "step 2", "step 4"]
    assert "held-out acc" in lines[-1] and "(step 4)" in lines[-1] and lines[-1].endswith("0s left")
    step = records[1]
    for key in ("reward_mean", "reward_std", "train_accuracy", "zero_variance_fraction", "completion_length",
                "rollout_tokens_per_s", "time_rollout", "time_reward"):
        assert key in step, key
    updated = [r for r in records[1:] if r["zero_variance_fraction"] < 1]
    assert updated, "no step had a group with reward variance"
    for key in ("loss", "approx_kl_old", "kl_ref", "clip_fraction", "entropy", "grad_norm", "time_update"):
        assert key in updated[0], key
    assert "heldout_accuracy" in records[0] and "heldout_accuracy" in records[2]
    assert (run / "curves.png").stat().st_size > 10_000
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-000004"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-000002", "step-000004"]
    assert (run / "final_policy" / "model.safetensors").exists()
    assert summary["heldout_accuracy_before"] == records[0]["heldout_accuracy"]


def test_resume_continues_from_the_last_checkpoint_and_matches_an_uninterrupted_run(tmp_path):
    straight = Trainer(small_config(tmp_path / "a", eval_size=0))
    straight.train()
    first = Trainer(small_config(tmp_path / "b", eval_size=0, max_steps=2))
    first.train()
    resumed = Trainer(small_config(tmp_path / "b", eval_size=0, max_steps=4))
    resumed.train(resume=True)
    assert resumed.step == 4
    records = [json.loads(line) for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    for a, b in zip(straight.policy.model.parameters(), resumed.policy.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_resume_without_a_checkpoint_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        Trainer(small_config(tmp_path, eval_size=0)).train(resume=True)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["learning_rate=fast"], "learning_rate: expected a number, got 'fast'"),
        (["group_size=0"], "group_size must be >= 1, got 0"),
        (["envv=digitsort-v0"], "unknown config field\\(s\\) envv"),
        (["env=sudoku-v9"], "unknown env 'sudoku-v9'"),
        (["algorithm.name=reinforce++"], "unknown algorithm 'reinforce\\+\\+'"),
        (["algorithm.epsilon=-0.1"], "epsilon must be a number >= 0, got -0.1"),
        (["algorithm.loss_type=mean"], "loss_type must be one of"),
        (["algorithm.num_iteration=2"], "algorithm.num_iteration: d1 has no such field; the fields of d1 are .*num_iterations"),
        (["algorithm.name=spg", "algorithm.beta=0.1"], "algorithm.beta: spg has no such field"),
        (["algorithm.preset=fast"], "d1 has no preset 'fast'; its presets: digitsort"),
        (["rollout.temperature=hot"], "rollout.temperature: expected a number"),
        (["not-an-override"], "must look like field.path=value"),
        (['torch_compile={"mod": "max-autotune"}'], "torch_compile: unknown argument\\(s\\) mod; torch.compile takes "
                                                     "fullgraph, dynamic, backend, mode"),
        (["torch_compile=true"], "torch_compile: expected a mapping, got True \\(or null\\)"),
    ],
)
def test_config_errors_name_the_field_and_value(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve(load_config(TrainConfig, None, overrides))  # what the values alone show, at load; the rest here


def test_yaml_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(TrainConfig, bad)


def test_estimator_noise_lines_up_with_minibatches_of_shorter_prompts(tiny_policy):
    prompts = ["sort 12\n", "sort 12\n", "sort 5839201746\n", "sort 5839201746\n"]
    completions = tiny_policy.generate(prompts, temperature=1.0, seed=0)
    buffer = RolloutBuffer.from_rollouts(
        prompts, completions, [1.0, 0.0, 0.0, 1.0], [0, 0, 1, 1],
        completion_mask_fn=tiny_policy.completion_mask, pad_token_id=tiny_policy.tokenizer.pad_token_id,
    )
    config = build_config("d1", {"num_iterations": 2, "beta": 0.0, "estimator": "d1",
                                 "estimator_kwargs": {"p_mask_prompt": 1.0}})
    algorithm = make_algorithm("d1", config, mask_token_id=tiny_policy.mask_token_id)
    buffer = algorithm.advantages(buffer, 2)
    algorithm.prepare(tiny_policy, None, buffer, torch.Generator().manual_seed(0), micro_batch_size=1)
    short = buffer.select([0, 1])
    inputs = short.model_inputs()
    # With p_mask_prompt = 1 the noise masks exactly the real prompt tokens, also in a minibatch whose
    # prompts are all shorter than the buffer's longest.
    for k in range(2):
        assert torch.equal(short.columns["noise.prompt_masked"][:, k], inputs.prompt_attention.bool())
    loss, _ = algorithm.loss(tiny_policy, short, iteration=1)
    assert torch.isfinite(loss)


def test_the_default_config_is_the_cli_default_run():
    from dare_gym.core.config import default_config_path

    assert TrainConfig() == load_config(TrainConfig, default_config_path())


REWARD_FILE = """
def half(completion, sample):
    return 0.5
"""


def test_a_reward_callable_is_saved_as_a_reference_that_re_creates_it(tmp_path):
    from dare_gym.train.user_code import import_module, resolve_env_kwargs

    path = tmp_path / "reward_file_for_test.py"
    path.write_text(REWARD_FILE)
    half = import_module(str(path)).half
    config = small_config(tmp_path, max_steps=1, eval_size=4)
    config.env_kwargs = {"reward": [(half, 2.0), ("exact_match", 1.0)]}  # what a Python user passes
    Trainer(config).train()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["env_kwargs"]["reward"] == [[f"{path}:half", 2.0], ["exact_match", 1.0]]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["reward_mean"] >= 1.0  # 2 × 0.5 on every rollout, plus the exact matches
    again = load_config(TrainConfig, tmp_path / "run" / "config.json")
    env = dare_gym.make("digitsort-v0", **resolve_env_kwargs(again.env_kwargs))
    assert env.reward_fn.terms[0][1] is half and env.reward_fn.terms[0][2] == 2.0


def test_a_reward_failing_on_most_rollouts_is_reported_once_per_log_every_steps(tmp_path, capsys):
    def always_fails(completion, sample):  # (the share that counts as "most" is tested in test_console.py)
        return 1.0 / (len(completion) * 0)

    config = small_config(tmp_path, max_steps=3, eval_size=0, log_every=2, prompts_per_step=4, group_size=2)
    config.env_kwargs = {"reward": always_fails}
    Trainer(config).train()
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: reward")]
    assert len(warnings) == 2 and "8 of 8 rollouts at step 1 " in warnings[0] and "at step 3 " in warnings[1]
    assert "'always_fails'" in warnings[0] and "e.g. ZeroDivisionError: float division by zero" in warnings[0]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["env_kwargs"]["reward"].endswith(
        "test_a_reward_failing_on_most_rollouts_is_reported_once_per_log_every_steps.<locals>.always_fails")
    with pytest.raises(ConfigError, match="lambda or a function defined inside another function"):
        resolve(load_config(TrainConfig, tmp_path / "run" / "config.json"))


def test_sft_on_demonstrations_clones_the_envs_gold_answers(tmp_path):
    """SFT's own rollout asks the env (through the trainer's RolloutContext) for each prompt's gold answer: the
    row of "sort 583920" carries "023589" then EOS padding, and an update trains on it."""
    from dare_gym.algorithms.sft import DEMONSTRATION_IDS

    trainer = Trainer(small_config(tmp_path, algorithm={"name": "sft", "source": "demonstrations"}, eval_size=0))
    buffer, _ = trainer.collect()
    tokenizer = trainer.policy.tokenizer
    for prompt, ids in zip(buffer.prompts, buffer.columns[DEMONSTRATION_IDS]):
        digits = prompt.split()[1]
        assert trainer.policy.decode(ids) == "".join(sorted(digits))
        assert ids[len(digits):].eq(tokenizer.eos_token_id).all()
    update = trainer.update(buffer)
    assert update["rows_trained"] == len(buffer) and math.isfinite(update["loss"])


def test_torch_compile_compiles_policy_and_reference_forwards_and_decodes_the_same_tokens(tmp_path):
    """torch_compile compiles the policy's and the reference's forward in place (torch's `eager` backend here:
    the same dynamo capture and guards as on a GPU, without a C++ toolchain); a compiled model decodes the
    same tokens as the uncompiled one and trains a step; FSDP2 refuses it up front."""
    from dare_gym.train.config import check_processes

    config = small_config(tmp_path, max_steps=1, eval_size=0, torch_compile={"backend": "eager"})
    trainer = Trainer(config)
    assert trainer.policy.model._compiled_call_impl is not None
    assert trainer.reference.model._compiled_call_impl is not None
    plain = dare_gym.load_policy("tiny")
    prompts = ["3 1 2\n", "9 0 5 4\n"]
    decode = {"temperature": 0.0, "seed": 0}
    assert [c.text for c in trainer.policy.generate(prompts, **decode)] == \
        [c.text for c in plain.generate(prompts, **decode)]
    assert trainer.train()["steps"] == 1
    fsdp = small_config(tmp_path, strategy="fsdp", torch_compile={})
    with pytest.raises(ConfigError, match="torch_compile with strategy fsdp is not supported"):
        check_processes(fsdp, 2)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "experiments" / "configs").glob("*.yaml")),
                         ids=lambda path: path.name)
def test_every_experiment_config_loads_and_resolves(path):
    """The configs the README and BENCHMARKS.md point to stay valid as fields change (the comparison configs add
    `algorithm_options`, which `dare-gym compare` reads, not the trainer)."""
    import yaml

    from dare_gym.tools.compare import plan_comparison

    if "algorithm_options" in yaml.safe_load(path.read_text()) or path.name.startswith("compare") or \
            path.name.startswith("paper"):
        plan = plan_comparison(["d1"], [0], 1280, config_path=path)
        assert not plan.config_errors, plan.config_errors
    else:
        resolve(load_config(TrainConfig, path, []))
