"""The training loop: collect, score, compute advantages, update, evaluate, log, checkpoint.

    env.reset ─prompts─▶ algorithm.rollout (policy.generate) ─completions─▶ env.step ─rewards─▶ RolloutBuffer
        ─▶ algorithm.advantages ─▶ algorithm.prepare ─▶ algorithm.update_plan: per optimizer step, its
           minibatches' algorithm.backward ─▶ optimizer (by default num_iterations passes over the batch)

The trainer is the only place that knows envs, policies and algorithms at once; it dispatches on nothing.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dare_gym
from dare_gym.core import distributed
from dare_gym.core.advantages import zero_variance_groups
from dare_gym.algorithms import make_algorithm
from dare_gym.algorithms.base import RolloutContext
from dare_gym.core.buffer import RolloutBuffer, right_pad
from dare_gym.train.checkpoints import (
    CHECKPOINT_DIR,
    atomic_write_text,
    latest_checkpoint,
    read_checkpoint,
    write_checkpoint,
)
from dare_gym.core.config import ConfigError
from dare_gym.train.console import (
    RewardFailureMonitor,
    TrainingProgress,
    quiet_library_warnings,
    rollout_reward_errors,
)
from dare_gym.core.device import make_generator, resolve_device, resolve_dtype
from dare_gym.envs.splits import SplitOverlapError, guard_held_out
from dare_gym.train.evaluation import evaluate
from dare_gym.core.lora import (
    adapter_disabled_reference,
    apply_lora,
    load_lora_weights,
    save_lora_policy,
)
from dare_gym.train.metrics import METRICS_FILE, SAMPLES_FILE, MetricsLogger, plot_metrics
from dare_gym.core.precision import MasterWeightAdamW, compile_forward, enable_activation_checkpointing
from dare_gym.samplers import get_sampler
from dare_gym.train.signal import NoSignalWatch, RewardFailedEverywhere, no_signal_cause, strict_reward_problem
from dare_gym.train.config import DEFAULT_ALGORITHM, DEFAULT_RECIPE, GenerationConfig, RunConfig, TrainConfig, resolve
from dare_gym.train.user_code import (
    jsonable,
)

SAMPLERS_FILE = "samplers.json"  # the resolved sampler settings of a run's rollouts and evaluations
RANK_SEED_STRIDE = 1_000_003  # rank r of a distributed run seeds its streams with seed + r * stride


def _sampler_arguments(settings: dict[str, Any]) -> dict[str, Any]:
    """``policy.sampler_settings`` arguments from ``GenerationConfig.as_kwargs()``."""
    settings = dict(settings)
    return {"sampler": settings.pop("sampler", None), "options": settings}


def mean_completion_length(policy, completions) -> float:
    """The mean number of tokens a loss scores per completion (up to and including the first stop token), in
    one pass over the batch (the buffer's rows need not be the completions: d-TreeRPO's are tree segments)."""
    ids, present = right_pad([c.completion_ids for c in completions], policy.stop_token_ids[0])
    return float((policy.completion_mask(ids) * present).sum(dim=1).float().mean())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Runs one algorithm on one env with one policy, as a :class:`TrainConfig` says."""

    def __init__(self, config: TrainConfig, policy=None):
        self.group = distributed.setup(config.device)  # one process unless launched by torchrun
        run = resolve(config, processes=self.group.world_size, policy_files=policy is None)
        self.config = config = run.config
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        seed_everything(config.seed)
        device = resolve_device(distributed.rank_device(config.device, self.group))
        compute_dtype = resolve_dtype(config.dtype, device)
        fsdp = self.group.world_size > 1 and config.strategy == "fsdp"
        with quiet_library_warnings():
            # FSDP keeps float32 shards (the master weights) and runs forwards in compute_dtype
            self.policy = policy if policy is not None else dare_gym.load_policy(
                config.policy, device=device, dtype=torch.float32 if fsdp else compute_dtype,
                family=config.policy_family)
            if config.gradient_checkpointing:
                enable_activation_checkpointing(self.policy.model)
            if config.lora is not None:
                apply_lora(self.policy, config.lora, verbose=config.progress)
        try:  # sampler names and options are checked against the policy now, not at the first rollout
            self.policy.sampler_settings(**_sampler_arguments(config.rollout.as_kwargs()))
            self.policy.sampler_settings(**_sampler_arguments(config.evaluation.as_kwargs()))
        except ValueError as error:
            raise ConfigError(f"rollout/evaluation: {error}") from None
        self.algorithm = make_algorithm(
            config.algorithm["name"], run.algorithm, mask_token_id=self.policy.mask_token_id,
            noise=self.policy.family.noise, vocab_size=self.policy.family.vocab_size(self.policy.model.config),
        )
        self.reference = None
        if self.algorithm.needs_reference:
            if config.lora is not None:  # the same weights with the adapters switched off: no second copy
                self.reference = adapter_disabled_reference(self.policy)
            else:
                self.reference = copy.copy(self.policy)
                self.reference.model = copy.deepcopy(self.policy.model).eval().requires_grad_(False)
        if config.torch_compile is not None:  # after the reference's copy: each model compiles its own forward
            compile_forward(self.policy.model, config.torch_compile)
            if self.reference is not None and self.reference.model is not self.policy.model:
                compile_forward(self.reference.model, config.torch_compile)
        if self.group.world_size > 1:
            self._distribute(config, device, compute_dtype)
        self.train_env = dare_gym.make_vec(
            config.env, config.prompts_per_step // self.group.world_size * config.group_size,
            group_size=config.group_size, **run.env_kwargs,
        )
        self.eval_env = dare_gym.make(config.env, **run.eval_env_kwargs)
        try:  # no held-out record is ever trained on: procedural streams skip them, file splits must not share any
            guard_held_out(self.train_env.envs, self.eval_env, eval_size=config.eval_size,
                           allow_overlap=config.allow_eval_overlap)
        except SplitOverlapError as error:
            raise ConfigError(str(error)) from None
        self.optimizer = MasterWeightAdamW(self.policy.model.parameters(), lr=config.learning_rate,
                                           betas=config.adam_betas, weight_decay=config.weight_decay)
        # every draw (sampler noise, estimator masks, minibatch order) comes from this one seeded stream, on the
        # model's device: reproducible for a seed on a device
        # model's device: reproducible for a seed on a device; each rank of a distributed run has its own stream
        self.generator = make_generator(self.policy.device, config.seed + RANK_SEED_STRIDE * self.group.rank)
        self.output_dir = Path(config.output_dir)
        self.step = 0
        self.elapsed_before_resume = 0.0
        self.last_reward_errors: list[dict[str, str]] = []  # per rollout of the last collected step
        self.last_samples: list[dict[str, Any]] = []  # a few rollouts of the last collected step
        self.train_env.reset(seed=config.seed + RANK_SEED_STRIDE * self.group.rank)

    def _distribute(self, config: TrainConfig, device: torch.device, compute_dtype: torch.dtype) -> None:
        """DDP or FSDP2 around the policy (and a full reference copy, sharded the same way under FSDP)."""
        if config.strategy == "ddp":
            distributed.wrap_ddp(self.policy, device)
            return
        for section, settings in (("rollout", config.rollout), ("evaluation", config.evaluation)):
            name, options = self.policy.sampler_settings(**_sampler_arguments(settings.as_kwargs()))
            why = get_sampler(name).data_dependent_steps(options)
            if why:  # every forward is a collective under FSDP: ranks must make the same number of them
                raise ConfigError(f"{section}: strategy fsdp needs a fixed number of sampler forwards on every rank, "
                                  f"but {name} {why}; or use strategy ddp")
        distributed.wrap_fsdp(self.policy, compute_dtype)
        if self.reference is not None and self.reference.model is not self.policy.model:
            distributed.shard_fsdp(self.reference.model, compute_dtype, self.reference.family)

    # ---------------------------------------------------------------------------------- one GRPO step
    def collect(self) -> tuple[RolloutBuffer, dict[str, float]]:
        """Sample a group of completions per prompt (as the algorithm's ``rollout`` does it), score them, and fill
        a buffer."""
        timings = {}
        start = time.perf_counter()
        prompts, infos = self.train_env.reset()
        context = RolloutContext(indices=infos["index"].tolist(), score_texts=self.train_env.score_texts,
                                 demonstrations=self.train_env.demonstrations, env_id=self.config.env,
                                 hints=self.train_env.hints, judge=self.train_env.judge)
        rollout = self.algorithm.rollout(self.policy, list(prompts), group_size=self.config.group_size,
                                         generator=self.generator, batch_size=self.config.rollout_batch_size,
                                         settings=self.rollout_kwargs(), context=context)
        completions = rollout.completions
        timings["time_rollout"] = time.perf_counter() - start
        start = time.perf_counter()
        _, rewards, _, _, step_infos = self.train_env.step([c.text for c in completions])
        step_infos = step_infos["final_info"]  # the scored episodes' infos (the top level is the autoreset's)
        buffer = rollout.buffer(rewards.tolist(), infos["group_id"].tolist(), correct=step_infos["correct"].tolist())
        timings["time_reward"] = time.perf_counter() - start
        generated = sum(len(c.completion_ids) for c in completions)
        self.last_reward_errors = rollout_reward_errors(step_infos, len(completions))
        self.last_samples = [  # one rollout of each of the first log_samples groups, for samples.jsonl
            {"prompt": str(prompts[i]), "completion": completions[i].text, "reward": float(rewards[i]),
             "correct": bool(step_infos["correct"][i])}
            for i in range(0, len(completions), self.config.group_size)][: self.config.log_samples]
        stats = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "train_accuracy": float(step_infos["correct"].mean()),
            "zero_variance_fraction": float(zero_variance_groups(torch.as_tensor(rewards), self.config.group_size)
                                            .float().mean()),
            "completion_length": mean_completion_length(self.policy, completions),
            # completions that ran to the length limit without a stop token (verl's response clip ratio)
            "truncated_fraction": float(sum(not bool(self.policy.ended(c.completion_ids[None])[0])
                                            for c in completions) / max(len(completions), 1)),
            "rollout_tokens_per_s": generated / max(timings["time_rollout"], 1e-9),
            "reward_errors": sum(1 for errors in self.last_reward_errors if errors),
            **timings,
        }
        return buffer, stats

    def sampler_record(self) -> dict[str, dict[str, Any]]:
        """Every setting the rollout and evaluation samplers run with, defaults included (``samplers.json``): a
        result says how its completions were produced (fast_dllm's early exit, say, which Fast-dLLM lacks)."""
        record = {}
        for section, settings in (("rollout", self.rollout_kwargs()), ("evaluation", self.config.evaluation.as_kwargs())):
            name, options = self.policy.sampler_settings(**_sampler_arguments(settings))
            record[section] = {"sampler": name, **jsonable(asdict(options))}
        return record

    def rollout_kwargs(self) -> dict[str, Any]:
        """The sampler settings for rollouts: the config's, then what the algorithm requires (MDPO's tempered
        confidence; JustGRPO's left-to-right order, which the sampler translates into its own options)."""
        settings = {**self.config.rollout.as_kwargs(), **self.algorithm.rollout_settings}
        if self.algorithm.rollout_order == "left_to_right":
            name = self.policy.sampler_name(settings.get("sampler"))
            gen_length = settings.get("gen_length", self.policy.generation_defaults["gen_length"])
            settings.update(get_sampler(name).left_to_right(self.policy, gen_length))
        return settings

    def after_update(self) -> None:
        """Tell the rollout sampler the policy changed (a served backend, ``vllm``, syncs its weights)."""
        name, options = self.policy.sampler_settings(**_sampler_arguments(self.rollout_kwargs()))
        get_sampler(name).after_update(self.policy, options)

    def update(self, buffer: RolloutBuffer) -> dict[str, float]:
        """Advantages, scoring and ``num_iterations`` optimizer steps on one batch of rollouts.

        A micro-batch's gradient is weighted by its share of the (global) batch's rows, and synchronised across
        the ranks of a distributed run on the last one only; a loss or gradient that is not finite on any rank
        stops every rank."""
        config = self.config
        rows_collected = len(buffer)
        buffer = self.algorithm.advantages(buffer, config.group_size)
        active = float(distributed.global_sum(buffer.active_rows().sum()))
        stats: dict[str, float] = {"rows_trained": active / self.group.world_size,
                                   "rows_collected": float(rows_collected)}
        if active == 0:
            return stats  # every group scored uniformly: no signal in this batch
        start = time.perf_counter()
        self.policy.model.train()
        self.algorithm.prepare(self.policy, self.reference, buffer, self.generator, config.micro_batch_size)
        totals: dict[str, list[float]] = {}
        for iteration, minibatches in self.algorithm.update_plan(buffer, config.micro_batch_size, self.generator):
            self.optimizer.zero_grad()
            minibatches = list(minibatches)
            step_rows = float(distributed.global_sum(sum(m.active_rows().sum() for m in minibatches)))
            for number, minibatch in enumerate(minibatches):
                share = float(distributed.global_sum(minibatch.active_rows().sum())) / max(step_rows, 1.0)
                weight = share * self.group.world_size  # DDP and FSDP average the ranks' gradients
                with self.policy.gradient_sync(number == len(minibatches) - 1):
                    loss, metrics = self.algorithm.backward(self.policy, minibatch, iteration, weight)
                for key, value in dict(metrics, loss=loss).items():
                    totals.setdefault(key, []).append(value)
            grad_norm = self.optimizer.clip_and_step(config.max_grad_norm)
            totals.setdefault("grad_norm", []).append(grad_norm)
            if not all(math.isfinite(v) for v in (grad_norm, *totals["loss"][-len(minibatches):])):
                problem = f"loss {totals['loss'][-1]} / gradient norm {grad_norm} at step {self.step + 1}"
            else:
                problem = None
            distributed.raise_if_any(problem)
            self.algorithm.after_optimizer_step()  # e.g. PPO steps its value model
        self.policy.model.eval()
        stats.update({key: float(np.mean(values)) for key, values in totals.items()})
        stats["time_update"] = time.perf_counter() - start
        return stats

    # ------------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy and reward of the policy's completions, and ``time_eval``, the seconds it took
        (the time a run spent learning is its ``elapsed_s`` less the ``time_eval`` of the records before).
        In a distributed run every rank scores an equal share of the records (the last padded with repeats)."""
        if self.config.eval_size == 0:
            return {}
        start = time.perf_counter()
        count = self.eval_env.num_records
        records = list(range(self.config.eval_size if count is None else min(count, self.config.eval_size)))
        size, rank = self.group.world_size, self.group.rank
        share = records[rank::size]
        share_size = -(-len(records) // size)
        result = evaluate(
            self.policy, self.eval_env, indices=share + [records[-1]] * (share_size - len(share)),
            batch_size=self.config.rollout_batch_size, **self.config.evaluation.as_kwargs(),
        )
        scored = list(zip(share, result.correct, result.rewards))
        scored = [row for rows in distributed.gather_objects(scored) for row in rows]
        return {"heldout_accuracy": sum(c for _, c, _ in scored) / len(scored),
                "heldout_reward": sum(r for _, _, r in scored) / len(scored),
                "time_eval": time.perf_counter() - start}

    # ----------------------------------------------------------------------------------- checkpoints
    def checkpoint_root(self) -> Path:
        return self.output_dir / CHECKPOINT_DIR

    @property
    def sharded(self) -> bool:
        return self.group.world_size > 1 and self.config.strategy == "fsdp"

    def random_streams(self) -> dict[str, Any]:
        """This rank's random streams (sampler and estimator noise, minibatch order, problem draws)."""
        return {"generator": self.generator.get_state(), "generator_device": str(self.generator.device),
                "torch_rng": torch.get_rng_state(), "env_rng": self.train_env.np_random.bit_generator.state}

    def save_checkpoint(self) -> Path | None:
        """Write the policy, optimizer and every rank's random streams to ``checkpoints/step-N``, atomically (rank 0
        writes; every rank takes part, since sharded states are gathered first)."""
        model_state = distributed.full_state_dict(self.policy.model) if self.sharded else None
        optimizer_state = distributed.full_optimizer_state(self.policy.model, self.optimizer.optimizer) \
            if self.sharded else self.optimizer.state_dict()
        streams = distributed.gather_objects(self.random_streams())
        final = None
        if self.group.is_main:
            state = {"optimizer": optimizer_state, "streams": streams, "world_size": self.group.world_size,
                     "algorithm": self.algorithm.state_dict()}
            info = {"step": self.step, "elapsed_s": self.elapsed(), "world_size": self.group.world_size,
                    "config": self.config.resolved()}
            final = write_checkpoint(self.checkpoint_root(), self.step, save_policy=lambda folder: self.save_policy(
                folder, merged=False, state_dict=model_state), state=state, info=info, keep=self.config.keep_checkpoints)
        distributed.barrier()
        return final

    def save_policy(self, path: Path, *, merged: bool, state_dict: dict | None = None) -> None:
        if self.config.lora is None:
            self.policy.save_pretrained(path, state_dict=state_dict)
        else:
            save_lora_policy(self.policy, path, merged=merged)

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.checkpoint_root())

    def load_checkpoint(self, path: Path) -> None:
        """Resume from ``path``, with the same or another number of processes (a sharded model loads the whole
        state; with another number of processes each rank's random streams are reseeded from seed and step)."""
        from safetensors.torch import load_file

        state, info = read_checkpoint(path)
        if self.config.lora is not None:
            load_lora_weights(self.policy, path / "policy")
            self.optimizer.load_state_dict(state["optimizer"])
        elif self.sharded:
            distributed.load_full_state(self.policy.model, load_file(str(path / "policy" / "model.safetensors")),
                                        self.optimizer.optimizer, state["optimizer"])
        else:
            self.policy.model.load_state_dict(load_file(str(path / "policy" / "model.safetensors")))
            self.optimizer.load_state_dict(state["optimizer"])
        streams = state.get("streams") or [state]  # checkpoints from before distributed runs kept one stream
        mine = streams[self.group.rank] if len(streams) == self.group.world_size else None
        if mine is not None and torch.device(mine.get("generator_device", "cpu")).type == self.generator.device.type:
            self.generator.set_state(mine["generator"])
            torch.set_rng_state(mine["torch_rng"])
            self.train_env.np_random.bit_generator.state = mine["env_rng"]
        else:  # another number of processes or another device: go on reproducibly, on streams of their own
            if self.group.is_main:
                warnings.warn(f"resuming with {self.group.world_size} process(es) on {self.generator.device} a run "
                              f"saved with {len(streams)} on {streams[0].get('generator_device', 'cpu')}: the random "
                              f"streams are reseeded from seed {self.config.seed} and step {info['step']}",
                              stacklevel=2)
            reseed = self.config.seed + RANK_SEED_STRIDE * self.group.rank + 7919 * (1 + info["step"])
            self.generator.manual_seed(reseed)
            self.train_env.reset(seed=reseed)
        if state.get("algorithm"):
            self.algorithm.load_state_dict(state["algorithm"])
        self.step = info["step"]
        self.elapsed_before_resume = info["elapsed_s"]

    # ------------------------------------------------------------------------------------------ loop
    def elapsed(self) -> float:
        return self.elapsed_before_resume + (time.perf_counter() - self._started)

    def train(self, resume: bool = False) -> dict[str, Any]:
        """Train until ``max_steps`` (or the ``time_limit_minutes`` guard, or ``stop_after_no_signal_steps``
        steps in a row with no learning signal); returns a summary with the held-out accuracy before and after,
        ``stopped_by`` (``max_steps``, ``time_limit`` or ``no_signal``) and ``stop_message`` (None at max_steps).
        In a distributed run every rank calls this; rank 0 logs, plots and writes."""
        config = self.config
        main = self.group.is_main
        self.output_dir.mkdir(parents=True, exist_ok=True)
        logger = MetricsLogger(self.output_dir / METRICS_FILE,
                               self.output_dir / "tensorboard" if config.tensorboard else None,
                               wandb=config.wandb, run_config=config.resolved()) if main else None
        self._started = time.perf_counter()
        if resume:
            checkpoint = self.latest_checkpoint()
            if checkpoint is None:
                raise FileNotFoundError(f"--resume: no checkpoint under {self.checkpoint_root()}")
            self.load_checkpoint(checkpoint)
            if main:
                logger.truncate_after(self.step)
            self._started = time.perf_counter()
        else:
            for name in (METRICS_FILE, SAMPLES_FILE):
                if main and (self.output_dir / name).exists():
                    (self.output_dir / name).unlink()
            if main:
                atomic_write_text(self.output_dir / "config.json", json.dumps(config.resolved(), indent=2) + "\n")
                atomic_write_text(self.output_dir / SAMPLERS_FILE, json.dumps(self.sampler_record(), indent=2) + "\n")
            first = {"step": 0, "elapsed_s": 0.0, **self.evaluate()}
            if main:
                logger.log(first)
        history = logger.read() if main else []
        initial = next((r for r in history if "heldout_accuracy" in r), {})
        time_limit = None if config.time_limit_minutes is None else 60 * config.time_limit_minutes
        progress = TrainingProgress(max_steps=config.max_steps, time_limit_s=time_limit, start_step=self.step,
                                    start_elapsed=self.elapsed(), every=config.log_every,
                                    enabled=config.progress and main)
        failures = RewardFailureMonitor(every=config.log_every)
        no_signal = NoSignalWatch(config.stop_after_no_signal_steps, every=config.log_every)
        latest = next((r for r in reversed(history) if "heldout_accuracy" in r), {})  # a resumed run's last
        last_eval = {k: latest[k] for k in ("heldout_accuracy", "heldout_reward") if k in latest}
        eval_step = latest.get("step")
        if not resume and last_eval:
            progress.update(self.step, self.elapsed(), {}, last_eval, eval_step)
        stopped = "max_steps"

        def out_of_time() -> bool:  # one decision for every rank, so that none waits in a collective alone
            return bool(distributed.global_max(int(time_limit is not None and self.elapsed() >= time_limit)))

        try:
            while self.step < config.max_steps:
                if out_of_time():
                    stopped = "time_limit"
                    break
                buffer, stats = self.collect()
                for message in failures.check(self.step + 1, self.last_reward_errors):
                    progress.message(message)
                if config.strict_rewards:  # every rank decides together, so that none waits alone
                    problems = [p for p in distributed.gather_objects(
                        strict_reward_problem(self.step + 1, self.last_reward_errors)) if p]
                    if problems:
                        raise RewardFailedEverywhere(problems[0])
                learning_rate = config.learning_rate_at(self.step + 1)
                self.optimizer.set_learning_rate(learning_rate)
                stats.update(self.update(buffer), learning_rate=learning_rate)
                self.after_update()
                stats = distributed.mean_metrics(stats)
                self.step += 1
                cause = None if stats["rows_trained"] > 0 else no_signal_cause(
                    stats, group_size=config.group_size, reward_errors=self.last_reward_errors,
                    gen_length=self.rollout_kwargs().get("gen_length", self.policy.generation_defaults.get("gen_length")))
                message = no_signal.observe(self.step, stats["rows_trained"], cause)
                if message:
                    progress.message(message)
                if no_signal.exhausted:
                    stopped = "no_signal"
                is_last = self.step >= config.max_steps or stopped != "max_steps" or out_of_time()
                record = {"step": self.step, "elapsed_s": round(self.elapsed(), 2), **stats}
                if self.step % config.eval_every == 0 or is_last:
                    last_eval, eval_step = self.evaluate(), self.step
                    record.update(last_eval)
                if main:
                    logger.log(record)
                    if config.log_samples and (self.step % config.log_every == 0 or self.step == 1 or is_last):
                        logger.log_samples(self.step, self.last_samples)
                if self.step % config.save_every == 0:
                    self.save_checkpoint()
                progress.update(self.step, self.elapsed(), stats, last_eval, eval_step, last=is_last)
                if stopped != "max_steps":
                    break
        finally:
            progress.close()
        stop_message = {
            "max_steps": None,
            "time_limit": f"stopped by the time guard (time_limit_minutes={config.time_limit_minutes}) after "
                          f"{self.step} of max_steps={config.max_steps} steps: the machine was slower than the run "
                          f"expects; results are not comparable with a full run (time_limit_minutes=null lifts it)",
            "no_signal": no_signal.stop_message(),
        }[stopped]
        if stop_message and main:
            progress.message(stop_message)
        self.save_checkpoint()
        model_state = distributed.full_state_dict(self.policy.model) if self.sharded else None
        if main:
            self.save_policy(self.output_dir / "final_policy", merged=bool(config.lora and config.lora.merge_on_save),
                             state_dict=model_state)
        distributed.barrier()
        if not main:
            return {"steps": self.step, "rank": self.group.rank, "stopped_by": stopped, "stop_message": stop_message}
        logger.close()
        history = logger.read()
        final = [r for r in history if "heldout_accuracy" in r][-1] if config.eval_size else {}
        plot_path = plot_metrics(history, self.output_dir / "curves.png", title=f"{config.algorithm['name']} on {config.env}")
        summary = {
            "steps": self.step,
            "elapsed_s": round(self.elapsed(), 1),
            "processes": self.group.world_size,
            "heldout_accuracy_before": initial.get("heldout_accuracy"),
            "heldout_accuracy_after": final.get("heldout_accuracy"),
            "stopped_by": stopped,  # max_steps | time_limit | no_signal
            "stop_message": stop_message,
            "plot": str(plot_path),
            "metrics": str(self.output_dir / METRICS_FILE),
        }
        atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary


__all__ = ["DEFAULT_ALGORITHM", "DEFAULT_RECIPE", "GenerationConfig", "RunConfig", "TrainConfig", "Trainer", "resolve"]
