"""A training run's configuration: :class:`TrainConfig` (plain data, one field per setting, each with its default
and a one-line doc) and :func:`resolve`, which makes it runnable — imports the user's modules, checks the env,
rewards, algorithm and policy against the registries and files, builds the algorithm's typed config and picks
the device — before anything is launched or loaded.

    config = TrainConfig(algorithm={"name": "spg"}, max_steps=20)
    run = resolve(config)          # ConfigError naming the bad field and value, or a RunConfig
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

import dare_gym
from dare_gym.algorithms import build_config, get_algorithm
from dare_gym.algorithms.base import resolved_section
from dare_gym.core.config import ConfigError
from dare_gym.core.device import resolve_device, resolve_dtype
from dare_gym.core.distributed import STRATEGIES
from dare_gym.core.loading import policy_config, policy_family
from dare_gym.core.lora import LoraSettings
from dare_gym.models.families import get_family
from dare_gym.samplers import get_sampler
from dare_gym.samplers.llada import REMASKING_RULES
from dare_gym.train.schedule import LR_SCHEDULES, learning_rate_at, warmup_steps_of
from dare_gym.train.user_code import (
    import_module,
    jsonable,
    located_references,
    normalize_module_spec,
    resolve_env_kwargs,
)

DEFAULT_ALGORITHM = "d1"
# The embedded default runs d1's preset "digitsort" (its fields are in algorithms/d1.py); {"name": "d1"} is
# d1 at its paper's defaults, which learns slowly at the tiny model's scale.
DEFAULT_RECIPE = {"name": DEFAULT_ALGORITHM, "preset": "digitsort"}
# The default run is bounded by steps, so that it reproduces on any machine (time_limit_minutes only guards it)
DEFAULT_MAX_STEPS = 150


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
    min_new_tokens: int | None = None
    """no stop token at the first this many completion positions (llada, fast_dllm, block_diffusion)"""
    sampler: str | None = None
    """llada | fast_dllm | block_diffusion | diffusion_gemma | vllm (null: the family's own: diffusion_gemma for
    DiffusionGemma, block_diffusion for block-causal models, else llada)"""
    options: dict = field(default_factory=dict)
    """the sampler's own options, e.g. {cache: dual, threshold: 0.9} for fast_dllm"""

    def __post_init__(self):
        if self.min_new_tokens is not None and self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0 or null, got {self.min_new_tokens!r}")
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
    150 steps (a 5-minute guard stops it earlier on a slow machine, and says so). A dict passed as ``algorithm`` replaces that recipe as a whole: ``{"name": X}`` is algorithm X
    at its own defaults, ``{"name": X, "beta": 0}`` those defaults with one field changed; a section without a
    name keeps d1. On the command line ``algorithm.<field>=value`` changes one field, and
    ``algorithm.name=X`` chooses X afresh (see :func:`dare_gym.core.config.load_config_dict`)."""

    env: str = "digitsort-v0"
    """registered env id to train on (`dare-gym envs`)"""
    env_kwargs: dict = field(default_factory=dict)
    """arguments for the training env, e.g. {split: train, reward: my_rewards:exact}"""
    eval_env_kwargs: dict = field(default_factory=lambda: {"split": "test"})
    """arguments for the held-out env"""
    allow_eval_overlap: bool = False
    """train even where the training split shares records with the held-out set (refused by default)"""
    policy: str = "tiny"
    """policy name or checkpoint folder (LLaDA, Dream, SDAR, LLaDA2, DiffusionGemma checkpoints; built in: tiny,
    tiny-long, tiny-block, tiny-gemma, tiny-moe)"""
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
    torch_compile: dict | None = None
    """compile the policy's (and a separate reference's) forward with torch.compile, these being its keyword
    arguments ({} for its defaults, {mode: max-autotune}, {dynamic: true}); for GPUs at real sizes, where the
    fused kernels pay for the compile time (experiments/gpu_check.py measures it); null: off. One process or
    ddp (FSDP2 shards would need per-block compilation)"""
    algorithm: dict = field(default_factory=lambda: copy.deepcopy(DEFAULT_RECIPE))
    """algorithm name, an optional preset and options: fields not set take the algorithm's own defaults
    (`dare-gym algorithms` lists each one's fields and presets)"""
    imports: list[str] = field(default_factory=list)
    """modules or .py files imported first, to register rewards, envs or algorithms (--import)"""
    prompts_per_step: int = 32
    """prompts sampled per step (GRPO groups)"""
    group_size: int = 8
    """completions sampled per prompt"""
    max_steps: int = DEFAULT_MAX_STEPS
    """stop after this many steps (the default run: 150 steps, about 3.5 minutes on 2 quiet CPU cores)"""
    time_limit_minutes: float | None = 5.0
    """a guard: stop after this much wall time even before max_steps, and say so (null: no limit)"""
    stop_after_no_signal_steps: int | None = 50
    """stop the run after this many consecutive steps with no learning signal (rows_trained 0), saying why and
    what to change (null: never stop for it; each such step is reported on the console either way)"""
    strict_rewards: bool = False
    """fail the run at the first step where a reward term fails (raises, times out, returns a non-number) on
    every rollout, instead of scoring those rollouts 0 for it"""
    learning_rate: float = 1e-4
    """AdamW (peak) learning rate"""
    lr_schedule: str = "constant"
    """constant | linear | cosine: the rate after warmup, decaying to min_lr_ratio x learning_rate at max_steps
    (per training step; logged as learning_rate)"""
    warmup_steps: int = 0
    """steps of linear warmup from learning_rate / warmup_steps to learning_rate"""
    warmup_ratio: float = 0.0
    """warmup as a fraction of max_steps, rounded up (instead of warmup_steps)"""
    min_lr_ratio: float = 0.0
    """the floor of linear and cosine decay, as a fraction of learning_rate"""
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
    """also write TensorBoard scalars (and the samples, as text) to output_dir/tensorboard"""
    wandb: dict | None = None
    """also log to Weights & Biases (the wandb extra): wandb.init's arguments, e.g. {project: dllm-rl, mode: offline}"""
    log_samples: int = 4
    """rollouts (prompt, completion, reward) written to output_dir/samples.jsonl every log_every steps (0: none),
    one per group"""
    progress: bool = True
    """show progress: a bar on a terminal, else a plain line every log_every steps"""
    log_every: int = 10
    """steps between plain progress lines, and between reports of the same failing reward"""
    lora: LoraSettings | None = None
    """train LoRA adapters (e.g. {r: 8, alpha: 16}); the reference is the base with the adapters off"""

    def __post_init__(self):
        """Checks of the values themselves (types are checked by the YAML loader); what needs imports, the
        registries, the policy's files or the devices is checked by :func:`resolve`."""
        positive = ("prompts_per_step", "group_size", "max_steps", "micro_batch_size", "rollout_batch_size",
                    "eval_every", "save_every", "keep_checkpoints", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.learning_rate <= 0 or not math.isfinite(self.learning_rate):
            raise ConfigError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.warmup_ratio and self.warmup_steps:
            raise ConfigError(f"set warmup_steps ({self.warmup_steps}) or warmup_ratio ({self.warmup_ratio}), not both")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.log_samples < 0:
            raise ConfigError(f"log_samples must be >= 0, got {self.log_samples!r}")
        if self.eval_size < 0:
            raise ConfigError(f"eval_size must be >= 0, got {self.eval_size!r}")
        if self.stop_after_no_signal_steps is not None and self.stop_after_no_signal_steps < 1:
            raise ConfigError(f"stop_after_no_signal_steps must be >= 1 or null, got {self.stop_after_no_signal_steps!r}")
        if self.time_limit_minutes is not None and self.time_limit_minutes <= 0:
            raise ConfigError(f"time_limit_minutes must be > 0 or null, got {self.time_limit_minutes!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        check_compile_options(self.torch_compile)
        if not isinstance(self.algorithm, dict):
            raise ConfigError(f"algorithm must be a mapping with a name, got {self.algorithm!r}")
        if "name" not in self.algorithm:  # `algorithm.beta=0` alone changes one field of the default recipe
            self.algorithm = {**DEFAULT_RECIPE, **self.algorithm}

    def learning_rate_at(self, step: int) -> float:
        """The learning rate of training step ``step`` (1-based) under this config's schedule."""
        return learning_rate_at(step, peak=self.learning_rate, schedule=self.lr_schedule, max_steps=self.max_steps,
                                warmup_steps=warmup_steps_of(self.max_steps, self.warmup_steps, self.warmup_ratio),
                                min_lr_ratio=self.min_lr_ratio)

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


def check_compile_options(options: dict | None) -> None:
    """``torch_compile`` is null or a mapping of torch.compile's own keyword arguments (named on error)."""
    if options is None:
        return
    if not isinstance(options, dict):
        raise ConfigError(f"torch_compile must be a mapping of torch.compile arguments or null, got {options!r}")
    accepted = [name for name in inspect.signature(torch.compile).parameters if name != "model"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"torch_compile: unknown argument(s) {', '.join(unknown)}; torch.compile takes "
                          f"{', '.join(accepted)}")


@dataclass(frozen=True)
class RunConfig:
    """A :class:`TrainConfig` made runnable by :func:`resolve`."""

    config: TrainConfig  # with the user's module paths made absolute
    algorithm: Any  # the algorithm's typed config (every field resolved)
    env_kwargs: dict  # the env arguments with reward references imported
    eval_env_kwargs: dict
    device: torch.device  # where a single process runs (a distributed run gives each rank its own)
    dtype: torch.dtype


def resolve(config: TrainConfig, *, processes: int = 1, policy_files: bool = True) -> RunConfig:
    """Check everything ``config`` names against what is installed and registered, in order, stopping at the
    first problem with a :class:`ConfigError` that names the field and the value: the user's modules (they may
    register the env, rewards or algorithm named next), the env and its reward references, the algorithm and
    its fields, the model family, the device and dtype, a run on ``processes`` processes (whole groups per
    rank, an algorithm that can be distributed, no LoRA under FSDP) and, with ``policy_files``, whether the
    algorithm can train the policy's family (read from the policy's files, no weight loaded). Nothing is
    launched or loaded."""
    imports = [normalize_module_spec(spec) for spec in config.imports]
    for i, spec in enumerate(imports):
        import_module(spec, where=f"imports[{i}]")
    if config.env not in dare_gym.list_envs():
        raise ConfigError(f"env: unknown env {config.env!r}; registered: {', '.join(dare_gym.list_envs())}")
    env_kwargs = resolve_env_kwargs(config.env_kwargs, where="env_kwargs")
    eval_env_kwargs = resolve_env_kwargs(config.eval_env_kwargs, where="eval_env_kwargs")
    try:
        algorithm = config.algorithm_config()
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(f"algorithm: {error}") from None
    if config.policy_family is not None:
        try:
            get_family(config.policy_family)
        except ValueError as error:
            raise ConfigError(f"policy_family: {error}") from None
    try:
        dtype = resolve_dtype(config.dtype)
        device = resolve_device(config.device)  # a GPU that is not there is an error now, not at the first step
    except ValueError as error:
        raise ConfigError(str(error)) from None
    check_processes(config, processes)
    if policy_files:
        refuse_unsupported_family(config)
        check_sampler_sections(config)
    located = {name: {**kwargs, "reward": located_references(kwargs["reward"])} if "reward" in kwargs else kwargs
               for name, kwargs in (("env_kwargs", config.env_kwargs), ("eval_env_kwargs", config.eval_env_kwargs))}
    return RunConfig(replace(config, imports=imports, **located), algorithm, env_kwargs, eval_env_kwargs, device,
                     dtype)


def check_processes(config: TrainConfig, processes: int) -> None:
    """What a run on ``processes`` processes needs of the config (see :func:`resolve`)."""
    if processes < 2:
        return
    if config.prompts_per_step % processes:
        raise ConfigError(f"prompts_per_step={config.prompts_per_step} must be divisible by the number of "
                          f"processes ({processes}): each rank rolls out whole groups")
    unsupported = get_algorithm(config.algorithm["name"]).algorithm_class.distributed_unsupported
    if unsupported:
        raise ConfigError(f"{config.algorithm['name']}: {unsupported}: train it with one process")
    if config.strategy == "fsdp" and config.lora is not None:
        raise ConfigError("lora with strategy fsdp is not supported: LoRA's frozen base fits each GPU in bf16 "
                          "(16 GB for 8B), so train LoRA with strategy ddp")
    if config.strategy == "fsdp" and config.torch_compile is not None:
        raise ConfigError("torch_compile with strategy fsdp is not supported (FSDP2's per-block shards would need "
                          "per-block compilation): use strategy ddp, or torch_compile: null")


def check_sampler_sections(config: TrainConfig) -> None:
    """The rollout and evaluation sampler settings against the policy's files (its family, block size and saved
    generation defaults; no weight is loaded): an option the sampler does not take, or a full-attention sampler
    whose schedule cannot decode a block-causal model, is a :class:`ConfigError` naming the section, the option
    and the sampler to use."""
    from dare_gym.core.loading import policy_files_summary
    from dare_gym.samplers.base import choose_options

    try:
        block_size, defaults, own = policy_files_summary(config.policy, config.policy_family)
    except (OSError, ValueError, ImportError):
        return  # the policy cannot be read without loading it: the trainer checks after loading
    for section, settings in (("rollout", config.rollout), ("evaluation", config.evaluation)):
        arguments = settings.as_kwargs()
        name = arguments.pop("sampler", None)
        try:
            choose_options(name or own, defaults, arguments, default_sampler=own, block_size=block_size,
                           named=name is not None)
        except ValueError as error:
            message = str(error)
            for said in ("sampler=", "sampler is not set", "leave sampler unset"):  # name the section's field
                message = message.replace(said, said.replace("sampler", f"{section}.sampler"))
            raise ConfigError(f"{section}: {message}") from None


def refuse_unsupported_family(config: TrainConfig) -> None:
    """A :class:`ConfigError` with the algorithm's reason where it cannot train the policy's family (read from the
    policy's files, before any weight is loaded)."""
    try:
        family = policy_family(config.policy, config.policy_family)
    except (OSError, ValueError):
        return  # the policy cannot be read without loading it (a hub id offline): load_policy will say why
    model_config = policy_config(config.policy, config.policy_family)
    reason = get_algorithm(config.algorithm["name"]).algorithm_class.model_refusal(family, model_config)
    if reason:
        raise ConfigError(f"algorithm {config.algorithm['name']} cannot train policy {config.policy!r}: {reason}")
