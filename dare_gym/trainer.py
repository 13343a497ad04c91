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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dare_gym
from dare_gym import distributed
from dare_gym.advantages import zero_variance_groups
from dare_gym.algorithms import build_config, get_algorithm, make_algorithm
from dare_gym.algorithms.base import resolved_section
from dare_gym.buffer import RolloutBuffer, right_pad
from dare_gym.checkpoints import (
    CHECKPOINT_DIR,
    atomic_write_text,
    latest_checkpoint,
    read_checkpoint,
    write_checkpoint,
)
from dare_gym.config import ConfigError
from dare_gym.console import (
    RewardFailureMonitor,
    TrainingProgress,
    quiet_library_warnings,
    rollout_reward_errors,
)
from dare_gym.device import make_generator, resolve_device, resolve_dtype
from dare_gym.distributed import STRATEGIES
from dare_gym.envs.splits import SplitOverlapError, guard_held_out
from dare_gym.evaluation import evaluate
from dare_gym.loading import policy_family
from dare_gym.lora import (
    LoraSettings,
    adapter_disabled_reference,
    apply_lora,
    load_lora_weights,
    save_lora_policy,
)
from dare_gym.metrics import METRICS_FILE, MetricsLogger, plot_metrics
from dare_gym.models.families import get_family
from dare_gym.precision import MasterWeightAdamW, enable_activation_checkpointing
from dare_gym.samplers import get_sampler
from dare_gym.samplers.llada import REMASKING_RULES
from dare_gym.user_code import (
    import_module,
    jsonable,
    normalize_module_spec,
    resolve_env_kwargs,
)

DEFAULT_ALGORITHM = "d1"
SAMPLERS_FILE = "samplers.json"  # the resolved sampler settings of a run's rollouts and evaluations
RANK_SEED_STRIDE = 1_000_003  # rank r of a distributed run seeds its streams with seed + r * stride
# The embedded default runs d1's preset "digitsort" (its fields are in algorithms/d1.py); {"name": "d1"} is
# d1 at its paper's defaults, which learns slowly at the tiny model's scale.
DEFAULT_RECIPE = {"name": DEFAULT_ALGORITHM, "preset": "digitsort"}


@dataclass
class GenerationConfig:
    """Sampler settings (a ``rollout:`` or ``evaluation:`` section); None takes the policy's default (the tiny
    policy: 64 tokens in 64 steps, blocks of 32, greedy, low-confidence remasking)."""

    gen_length: int | None = None
    """completion length in tokens"""
    steps: int | None = None
    """denoising steps over the whole completion (fewer: several tokens committed per step)"""
    block_length: int | None = None
    """semi-autoregressive block length in tokens (gen_length: one block)"""
    temperature: float | None = None
    """sampling temperature; 0 is greedy"""
    remasking: str | None = None
    """which masked tokens are committed first: low_confidence or random"""
    sampler: str | None = None
    """llada | fast_dllm | block_diffusion | diffusion_gemma | vllm (null: the family's own: diffusion_gemma for
    DiffusionGemma, block_diffusion for block-causal models, else llada)"""
    options: dict = field(default_factory=dict)
    """the sampler's own options, e.g. {cache: dual, threshold: 0.9} for fast_dllm"""

    def __post_init__(self):
        for name in ("gen_length", "steps", "block_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {value!r}")
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 or null, got {self.temperature!r}")
        if self.remasking is not None and self.remasking not in REMASKING_RULES:
            raise ValueError(f"remasking must be one of {', '.join(REMASKING_RULES)} or null, got {self.remasking!r}")
        if self.sampler is not None:
            get_sampler(self.sampler)  # an unknown name is an error now, listing the registered ones

    def as_kwargs(self) -> dict[str, Any]:
        """``policy.generate`` keyword arguments: the set fields, then the sampler's own options."""
        settings = {k: v for k, v in asdict(self).items() if v is not None and k != "options"}
        return {**settings, **self.options}


@dataclass
class TrainConfig:
    """One training run. ``TrainConfig()`` is the run of ``dare-gym train`` with no arguments (the packaged
    ``dare_gym/configs/default.yaml``): d1's ``digitsort`` preset on digit sorting with the tiny policy, for
    5 minutes. A dict passed as ``algorithm`` replaces that recipe as a whole: ``{"name": X}`` is algorithm X
    at its own defaults, ``{"name": X, "beta": 0}`` those defaults with one field changed; a section without a
    name keeps d1. On the command line ``algorithm.<field>=value`` changes one field, and
    ``algorithm.name=X`` chooses X afresh (see :func:`dare_gym.config.load_config_dict`)."""

    env: str = "digitsort-v0"
    """registered env id to train on (`dare-gym envs`)"""
    env_kwargs: dict = field(default_factory=dict)
    """arguments for the training env, e.g. {split: train, reward: my_rewards:exact}"""
    eval_env_kwargs: dict = field(default_factory=lambda: {"split": "test"})
    """arguments for the held-out env"""
    allow_eval_overlap: bool = False
    """train even where the training split shares records with the held-out set (refused by default)"""
    policy: str = "tiny"
    """policy name or checkpoint folder (LLaDA, Dream, SDAR, DiffusionGemma checkpoints; built in: tiny, tiny-long,
    tiny-block, tiny-gemma)"""
    policy_family: str | None = None
    """force a model family (tiny, llada, dream, sdar) instead of the one config.json's model_type names"""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N (auto: the GPU when one is visible)"""
    dtype: str = "float32"
    """float32 | bfloat16 | auto for the weights and forward; log-probs, losses and optimizer state stay float32"""
    strategy: str = "ddp"
    """with several processes (torchrun, --nproc): ddp (a whole model per rank) or fsdp (FSDP2: parameters,
    gradients and optimizer state sharded per transformer block)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: much less memory for real models, about a third slower"""
    algorithm: dict = field(default_factory=lambda: copy.deepcopy(DEFAULT_RECIPE))
    """algorithm name, an optional preset and options: fields not set take the algorithm's own defaults
    (`dare-gym algorithms` lists each one's fields and presets)"""
    imports: list[str] = field(default_factory=list)
    """modules or .py files imported first, to register rewards, envs or algorithms (--import)"""
    prompts_per_step: int = 32
    """prompts sampled per step (GRPO groups)"""
    group_size: int = 8
    """completions sampled per prompt"""
    max_steps: int = 100_000
    """stop after this many steps"""
    time_limit_minutes: float | None = 5.0
    """stop after this much wall time (null: no limit)"""
    learning_rate: float = 1e-4
    """AdamW learning rate"""
    adam_betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradients are clipped to this global norm"""
    micro_batch_size: int = 256
    """rows per forward/backward in the update; gradients accumulate over the whole batch (one optimizer step
    per iteration), so lowering it saves memory and leaves the update the same"""
    rollout_batch_size: int = 256
    """prompts per sampler call for rollouts and evaluation"""
    rollout: GenerationConfig = field(default_factory=lambda: GenerationConfig(temperature=0.7))
    """sampler settings for training rollouts"""
    evaluation: GenerationConfig = field(default_factory=lambda: GenerationConfig(temperature=0.0))
    """sampler settings for held-out evaluation"""
    eval_every: int = 10
    """evaluate on the held-out set every this many steps (and after the last)"""
    eval_size: int = 500
    """held-out records scored, the first of the eval split (0: no evaluation)"""
    save_every: int = 25
    """write a checkpoint every this many steps (and after the last)"""
    keep_checkpoints: int = 2
    """checkpoints kept on disk, newest first"""
    output_dir: str = "runs/default"
    """folder for metrics.jsonl, curves.png, checkpoints/ and final_policy/"""
    seed: int = 0
    """seed of every random draw (problems, sampling, estimator noise)"""
    torch_threads: int | None = None
    """CPU threads for torch (null: torch's default)"""
    tensorboard: bool = False
    """also write TensorBoard scalars to output_dir/tensorboard"""
    progress: bool = True
    """show progress: a bar on a terminal, else a plain line every log_every steps"""
    log_every: int = 10
    """steps between plain progress lines, and between reports of the same failing reward"""
    lora: LoraSettings | None = None
    """train LoRA adapters (e.g. {r: 8, alpha: 16}); the reference is the base with the adapters off"""

    def __post_init__(self):
        # user modules first: they may register the env, the algorithm or the rewards named below
        self.imports = [normalize_module_spec(spec) for spec in self.imports]
        for i, spec in enumerate(self.imports):
            import_module(spec, where=f"imports[{i}]")
        positive = ("prompts_per_step", "group_size", "max_steps", "micro_batch_size", "rollout_batch_size",
                    "eval_every", "save_every", "keep_checkpoints", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.learning_rate <= 0 or not math.isfinite(self.learning_rate):
            raise ConfigError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        if self.eval_size < 0:
            raise ConfigError(f"eval_size must be >= 0, got {self.eval_size!r}")
        if self.time_limit_minutes is not None and self.time_limit_minutes <= 0:
            raise ConfigError(f"time_limit_minutes must be > 0 or null, got {self.time_limit_minutes!r}")
        try:
            resolve_dtype(self.dtype)
            if self.device.strip().lower() not in ("auto", "cpu"):
                resolve_device(self.device)  # a GPU that is not there is an error now, not at the first step
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.policy_family is not None:
            try:
                get_family(self.policy_family)
            except ValueError as error:
                raise ConfigError(f"policy_family: {error}") from None
        if self.env not in dare_gym.list_envs():
            raise ConfigError(f"env: unknown env {self.env!r}; registered: {', '.join(dare_gym.list_envs())}")
        for name in ("env_kwargs", "eval_env_kwargs"):  # a reward reference that does not import fails now
            resolve_env_kwargs(getattr(self, name), where=name)
        self.algorithm = {"name": DEFAULT_ALGORITHM, **self.algorithm}  # `algorithm.beta=0` alone keeps d1
        try:
            self.algorithm_config()  # validate now, with field names in the error
        except ConfigError:
            raise
        except ValueError as error:
            raise ConfigError(f"algorithm: {error}") from None

    def algorithm_config(self):
        options = {k: v for k, v in self.algorithm.items() if k != "name"}
        return build_config(self.algorithm["name"], options, where="algorithm")

    def resolved(self) -> dict[str, Any]:
        """This config as a run records it (``config.json``): the algorithm section with every field's value,
        so that the record says exactly what ran and resumes as the same run."""
        data = jsonable(asdict(self))
        options = {k: v for k, v in self.algorithm.items() if k != "name"}
        data["algorithm"] = jsonable(resolved_section(self.algorithm["name"], options))
        return data


def _sampler_arguments(settings: dict[str, Any]) -> dict[str, Any]:
    """``policy.sampler_settings`` arguments from ``GenerationConfig.as_kwargs()``."""
    settings = dict(settings)
    return {"sampler": settings.pop("sampler", None), "options": settings}


def mean_completion_length(policy, completions) -> float:
    """The mean number of tokens a loss scores per completion (up to and including the first stop token), in
    one pass over the batch (the buffer's rows need not be the completions: d-TreeRPO's are tree segments)."""
    ids, present = right_pad([c.completion_ids for c in completions], policy.stop_token_ids[0])
    return float((policy.completion_mask(ids) * present).sum(dim=1).float().mean())


def refuse_unsupported_family(config: TrainConfig) -> None:
    """A :class:`ConfigError` with the algorithm's reason where it cannot train the policy's family (read from the
    policy's files, before any weight is loaded)."""
    try:
        family = policy_family(config.policy, config.policy_family)
    except (OSError, ValueError):
        return  # the policy cannot be read without loading it (a hub id offline): load_policy will say why
    reason = get_algorithm(config.algorithm["name"]).algorithm_class.refusal(family)
    if reason:
        raise ConfigError(f"algorithm {config.algorithm['name']} cannot train policy {config.policy!r}: {reason}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Runs one algorithm on one env with one policy, as a :class:`TrainConfig` says."""

    def __init__(self, config: TrainConfig, policy=None):
        self.config = config
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        seed_everything(config.seed)
        self.group = distributed.setup(config.device)  # one process unless launched by torchrun
        if config.prompts_per_step % self.group.world_size:
            raise ConfigError(f"prompts_per_step={config.prompts_per_step} must be divisible by the number of "
                              f"processes ({self.group.world_size}): each rank rolls out whole groups")
        if policy is None:
            refuse_unsupported_family(config)
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
            config.algorithm["name"], config.algorithm_config(), mask_token_id=self.policy.mask_token_id,
            noise=self.policy.family.noise, vocab_size=self.policy.family.vocab_size(self.policy.model.config),
        )
        self.reference = None
        if self.algorithm.needs_reference:
            if config.lora is not None:  # the same weights with the adapters switched off: no second copy
                self.reference = adapter_disabled_reference(self.policy)
            else:
                self.reference = copy.copy(self.policy)
                self.reference.model = copy.deepcopy(self.policy.model).eval().requires_grad_(False)
        if self.group.world_size > 1:
            self._distribute(config, device, compute_dtype)
        self.train_env = dare_gym.make_vec(
            config.env, config.prompts_per_step // self.group.world_size * config.group_size,
            group_size=config.group_size, **resolve_env_kwargs(config.env_kwargs),
        )
        self.eval_env = dare_gym.make(config.env, **resolve_env_kwargs(config.eval_env_kwargs, where="eval_env_kwargs"))
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
        self.train_env.reset(seed=config.seed + RANK_SEED_STRIDE * self.group.rank)

    def _distribute(self, config: TrainConfig, device: torch.device, compute_dtype: torch.dtype) -> None:
        """DDP or FSDP2 around the policy (and a full reference copy, sharded the same way under FSDP)."""
        if self.algorithm.distributed_unsupported:
            raise ConfigError(f"{self.algorithm.name}: {self.algorithm.distributed_unsupported}: train it with one "
                              "process")
        if config.strategy == "ddp":
            distributed.wrap_ddp(self.policy, device)
            return
        if config.lora is not None:
            raise ConfigError("lora with strategy fsdp is not supported: LoRA's frozen base fits each GPU in bf16 "
                              "(16 GB for 8B), so train LoRA with strategy ddp")
        for section, settings in (("rollout", config.rollout), ("evaluation", config.evaluation)):
            name, options = self.policy.sampler_settings(**_sampler_arguments(settings.as_kwargs()))
            adaptive = any(getattr(options, key, None) for key in ("threshold", "factor", "early_exit"))
            if adaptive:  # every forward is a collective under FSDP: ranks must make the same number of them
                raise ConfigError(f"{section}: strategy fsdp needs a fixed number of sampler forwards on every rank; "
                                  f"{name} with threshold/factor/early_exit decides it from the data: set "
                                  "options {threshold: null, factor: null, early_exit: false} or use strategy ddp")
        distributed.wrap_fsdp(self.policy, compute_dtype)
        if self.reference is not None and self.reference.model is not self.policy.model:
            distributed.shard_fsdp(self.reference.model, compute_dtype, self.reference.family)

    # ---------------------------------------------------------------------------------- one GRPO step
    def collect(self) -> tuple[RolloutBuffer, dict[str, float]]:
        """Sample a group of completions per prompt (as the algorithm's ``rollout`` does it), score them, and fill
        a buffer."""
        timings = {}
        start = time.perf_counter()
        needs = set(self.algorithm.rollout_needs)
        prompts, infos = self.train_env.reset()
        rollout = self.algorithm.rollout(self.policy, list(prompts), group_size=self.config.group_size,
                                         generator=self.generator, batch_size=self.config.rollout_batch_size,
                                         settings=self.rollout_kwargs())
        completions = rollout.completions
        timings["time_rollout"] = time.perf_counter() - start
        start = time.perf_counter()
        _, rewards, _, _, step_infos = self.train_env.step([c.text for c in completions])
        step_infos = step_infos["final_info"]  # the scored episodes' infos (the top level is the autoreset's)
        buffer = rollout.buffer(rewards.tolist(), infos["group_id"].tolist(), correct=step_infos["correct"].tolist())
        if "step_predictions" in needs:
            self._add_step_rewards(buffer, completions, infos["index"])
        if "demonstrations" in needs:
            self._add_demonstrations(buffer, infos["index"])
        timings["time_reward"] = time.perf_counter() - start
        generated = sum(len(c.completion_ids) for c in completions)
        self.last_reward_errors = rollout_reward_errors(step_infos, len(completions))
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

    def _add_step_rewards(self, buffer: RolloutBuffer, completions, indices) -> None:
        """MDPO's intermediate rewards: the env's reward of the sampler's guess x̂₀ at every step."""
        step_rewards = [self.train_env.score_texts(index, [self.policy.decode(guess) for guess in c.step_predictions])
                        for c, index in zip(completions, indices)]
        buffer.columns["step_reward"] = torch.tensor(step_rewards, dtype=torch.float32)
        buffer.columns["step_prediction"] = torch.stack([c.step_predictions for c in completions])
        buffer.columns["step_confidence"] = torch.stack([c.step_confidence for c in completions])

    def _add_demonstrations(self, buffer: RolloutBuffer, indices) -> None:
        """Gold answers for behaviour cloning, tokenised and EOS-padded like the completions."""
        try:
            answers = self.train_env.demonstrations(indices)
        except NotImplementedError as error:
            raise ValueError(f"{self.config.env}: {error}; use sft's source: rollouts") from None
        tokenizer, width = self.policy.tokenizer, buffer.completion_ids.shape[1]
        rows = []
        for answer in answers:
            ids = tokenizer(answer, add_special_tokens=False)["input_ids"][: width - 1]
            rows.append(ids + [tokenizer.eos_token_id] * (width - len(ids)))
        buffer.columns["demonstration_ids"] = torch.tensor(rows, dtype=torch.long)

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
        active = float(distributed.global_sum(distributed.active_rows(buffer).sum()))
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
            step_rows = float(distributed.global_sum(sum(distributed.active_rows(m).sum() for m in minibatches)))
            for number, minibatch in enumerate(minibatches):
                share = float(distributed.global_sum(distributed.active_rows(minibatch).sum())) / max(step_rows, 1.0)
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
        """Train until ``max_steps`` or ``time_limit_minutes``; returns a summary with the held-out accuracy
        before and after. In a distributed run every rank calls this; rank 0 logs, plots and writes."""
        config = self.config
        main = self.group.is_main
        self.output_dir.mkdir(parents=True, exist_ok=True)
        logger = MetricsLogger(self.output_dir / METRICS_FILE,
                               self.output_dir / "tensorboard" if config.tensorboard else None) if main else None
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
            if main and (self.output_dir / METRICS_FILE).exists():
                (self.output_dir / METRICS_FILE).unlink()
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
        last_eval = {k: initial[k] for k in ("heldout_accuracy", "heldout_reward") if k in initial}
        eval_step = initial.get("step")
        if not resume and last_eval:
            progress.update(self.step, self.elapsed(), {}, last_eval, eval_step)

        def out_of_time() -> bool:  # one decision for every rank, so that none waits in a collective alone
            return bool(distributed.global_max(int(time_limit is not None and self.elapsed() >= time_limit)))

        try:
            while self.step < config.max_steps and not out_of_time():
                buffer, stats = self.collect()
                for message in failures.check(self.step + 1, self.last_reward_errors):
                    progress.message(message)
                stats.update(self.update(buffer))
                self.after_update()
                stats = distributed.mean_metrics(stats)
                self.step += 1
                is_last = self.step >= config.max_steps or out_of_time()
                record = {"step": self.step, "elapsed_s": round(self.elapsed(), 2), **stats}
                if self.step % config.eval_every == 0 or is_last:
                    last_eval, eval_step = self.evaluate(), self.step
                    record.update(last_eval)
                if main:
                    logger.log(record)
                if self.step % config.save_every == 0:
                    self.save_checkpoint()
                progress.update(self.step, self.elapsed(), stats, last_eval, eval_step, last=is_last)
        finally:
            progress.close()
        self.save_checkpoint()
        model_state = distributed.full_state_dict(self.policy.model) if self.sharded else None
        if main:
            self.save_policy(self.output_dir / "final_policy", merged=bool(config.lora and config.lora.merge_on_save),
                             state_dict=model_state)
        distributed.barrier()
        if not main:
            return {"steps": self.step, "rank": self.group.rank}
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
            "plot": str(plot_path),
            "metrics": str(self.output_dir / METRICS_FILE),
        }
        atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary
