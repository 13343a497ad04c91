"""The training loop: collect, score, compute advantages, update, evaluate, log, checkpoint.

    env.reset ─prompts─▶ policy.generate ─completions─▶ env.step ─rewards─▶ RolloutBuffer
        ─▶ algorithm.advantages ─▶ algorithm.prepare ─▶ num_iterations × (algorithm.loss ─▶ optimizer)

The trainer is the only place that knows envs, policies and algorithms at once; it dispatches on nothing.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import dare_gym
from dare_gym.advantages import zero_variance_groups
from dare_gym.algorithms import build_config, make_algorithm
from dare_gym.buffer import RolloutBuffer
from dare_gym.config import ConfigError
from dare_gym.envs.splits import SplitOverlapError, guard_held_out
from dare_gym.evaluation import evaluate
from dare_gym.lora import (
    LoraSettings,
    adapter_disabled_reference,
    apply_lora,
    load_lora_weights,
    save_lora_policy,
)

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
METRICS_FILE = "metrics.jsonl"
DEFAULT_ALGORITHM = "d1"


@dataclass
class GenerationConfig:
    """Sampler settings; None takes the policy's default."""

    gen_length: int | None = None
    steps: int | None = None
    block_length: int | None = None
    temperature: float | None = None
    remasking: str | None = None

    def as_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class TrainConfig:
    env: str = "digitsort-v0"
    env_kwargs: dict = field(default_factory=dict)
    eval_env_kwargs: dict = field(default_factory=lambda: {"split": "test"})
    allow_eval_overlap: bool = False  # train even where the training split shares records with the held-out set
    policy: str = "tiny"
    algorithm: dict = field(default_factory=lambda: {"name": DEFAULT_ALGORITHM})
    prompts_per_step: int = 32
    group_size: int = 8
    max_steps: int = 1000
    time_limit_minutes: float | None = None
    learning_rate: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    micro_batch_size: int = 256
    rollout: GenerationConfig = field(default_factory=lambda: GenerationConfig(temperature=0.7))
    evaluation: GenerationConfig = field(default_factory=lambda: GenerationConfig(temperature=0.0))
    eval_every: int = 10
    eval_size: int = 500
    save_every: int = 50
    keep_checkpoints: int = 2
    output_dir: str = "runs/default"
    seed: int = 0
    torch_threads: int | None = None
    tensorboard: bool = False
    progress: bool = True
    lora: LoraSettings | None = None  # train LoRA adapters (peft); the reference is the base, adapters off

    def __post_init__(self):
        positive = ("prompts_per_step", "group_size", "max_steps", "micro_batch_size", "eval_every", "save_every",
                    "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.learning_rate <= 0 or not math.isfinite(self.learning_rate):
            raise ConfigError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        if self.eval_size < 0:
            raise ConfigError(f"eval_size must be >= 0, got {self.eval_size!r}")
        if self.time_limit_minutes is not None and self.time_limit_minutes <= 0:
            raise ConfigError(f"time_limit_minutes must be > 0 or null, got {self.time_limit_minutes!r}")
        if self.env not in dare_gym.list_envs():
            raise ConfigError(f"env: unknown env {self.env!r}; registered: {', '.join(dare_gym.list_envs())}")
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


class MetricsLogger:
    """Appends one JSON object per line; optionally mirrors scalars to TensorBoard."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None):
        self.path = path
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard_dir))

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records logged after ``step`` (they belong to a run that did not reach a checkpoint)."""
        kept = [r for r in self.read() if r["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
        self.policy = policy if policy is not None else dare_gym.load_policy(config.policy)
        if config.lora is not None:
            apply_lora(self.policy, config.lora, verbose=config.progress)
        self.algorithm = make_algorithm(
            config.algorithm["name"], config.algorithm_config(), mask_token_id=self.policy.mask_token_id
        )
        self.reference = None
        if self.algorithm.needs_reference:
            if config.lora is not None:  # the same weights with the adapters switched off: no second copy
                self.reference = adapter_disabled_reference(self.policy)
            else:
                self.reference = copy.copy(self.policy)
                self.reference.model = copy.deepcopy(self.policy.model).eval().requires_grad_(False)
        self.train_env = dare_gym.make_vec(
            config.env, config.prompts_per_step * config.group_size, group_size=config.group_size, **config.env_kwargs
        )
        self.eval_env = dare_gym.make(config.env, **config.eval_env_kwargs)
        try:  # no held-out record is ever trained on: procedural streams skip them, file splits must not share any
            guard_held_out(self.train_env.envs, self.eval_env, eval_size=config.eval_size,
                           allow_overlap=config.allow_eval_overlap)
        except SplitOverlapError as error:
            raise ConfigError(str(error)) from None
        self.optimizer = torch.optim.AdamW(
            [p for p in self.policy.model.parameters() if p.requires_grad], lr=config.learning_rate,
            betas=config.adam_betas,
            weight_decay=config.weight_decay,
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.output_dir = Path(config.output_dir)
        self.step = 0
        self.elapsed_before_resume = 0.0
        self.train_env.reset(seed=config.seed)

    # ---------------------------------------------------------------------------------- one GRPO step
    def collect(self) -> tuple[RolloutBuffer, dict[str, float]]:
        """Sample a group of completions per prompt, score them, and fill a buffer."""
        timings = {}
        start = time.perf_counter()
        needs = set(getattr(self.algorithm, "rollout_needs", ()))
        prompts, infos = self.train_env.reset()
        completions = self.policy.generate(
            list(prompts), generator=self.generator, batch_size=self.config.micro_batch_size,
            record_predictions="step_predictions" in needs, **self.rollout_kwargs(),
        )
        timings["time_rollout"] = time.perf_counter() - start
        start = time.perf_counter()
        _, rewards, _, _, step_infos = self.train_env.step([c.text for c in completions])
        step_infos = step_infos["final_info"]  # the scored episodes' infos (the top level is the autoreset's)
        buffer = RolloutBuffer.from_rollouts(
            prompts, completions, rewards.tolist(), infos["group_id"].tolist(),
            completion_mask_fn=self.policy.completion_mask, pad_token_id=self.policy.tokenizer.pad_token_id,
        )
        if "step_predictions" in needs:
            self._add_step_rewards(buffer, completions, prompts, infos["index"])
        if "demonstrations" in needs:
            self._add_demonstrations(buffer, infos["index"])
        timings["time_reward"] = time.perf_counter() - start
        generated = sum(len(c.completion_ids) for c in completions)
        stats = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "train_accuracy": float(step_infos["correct"].mean()),
            "completion_length": float(buffer.completion_mask.sum(dim=1).float().mean()),
            "rollout_tokens_per_s": generated / max(timings["time_rollout"], 1e-9),
            "reward_errors": int(step_infos.get("_reward_errors", np.zeros(1, bool)).sum()),
            **timings,
        }
        return buffer, stats

    def rollout_kwargs(self) -> dict[str, Any]:
        """The sampler settings for rollouts: the config's, then what the algorithm requires (JustGRPO
        decodes left to right, one token per step: ``{"block_length": 1, "steps": "gen_length"}``)."""
        settings = self.config.rollout.as_kwargs()
        required = getattr(self.algorithm, "rollout_settings", {})
        if required:
            gen_length = settings.get("gen_length", self.policy.generation_defaults["gen_length"])
            settings.update({key: gen_length if value == "gen_length" else value for key, value in required.items()})
        return settings

    def _records(self, indices) -> list[dict]:
        return [env.record(int(i)) for env, i in zip(self.train_env.envs, indices)]

    def _add_step_rewards(self, buffer: RolloutBuffer, completions, prompts, indices) -> None:
        """MDPO's intermediate rewards: the env's reward of the sampler's guess x̂₀ at every step."""
        reward_fn = self.train_env.envs[0].reward_fn
        step_rewards = []
        for completion, prompt, record in zip(completions, prompts, self._records(indices)):
            texts = [self.policy.decode(guess) for guess in completion.step_predictions]
            results = reward_fn.score_many(texts, [record] * len(texts), [prompt] * len(texts))
            step_rewards.append([r.total for r in results])
        buffer.columns["step_reward"] = torch.tensor(step_rewards, dtype=torch.float32)
        buffer.columns["step_prediction"] = torch.stack([c.step_predictions for c in completions])
        buffer.columns["step_confidence"] = torch.stack([c.step_confidence for c in completions])

    def _add_demonstrations(self, buffer: RolloutBuffer, indices) -> None:
        """Gold answers for behaviour cloning, tokenised and EOS-padded like the completions."""
        env = self.train_env.envs[0]
        if not hasattr(env, "demonstration"):
            raise ValueError(f"{self.config.env} has no demonstrations for SFT; use sft's source: rollouts")
        tokenizer, width = self.policy.tokenizer, buffer.completion_ids.shape[1]
        rows = []
        for record in self._records(indices):
            ids = tokenizer(env.demonstration(record), add_special_tokens=False)["input_ids"][: width - 1]
            rows.append(ids + [tokenizer.eos_token_id] * (width - len(ids)))
        buffer.columns["demonstration_ids"] = torch.tensor(rows, dtype=torch.long)

    def update(self, buffer: RolloutBuffer) -> dict[str, float]:
        """Advantages, scoring and ``num_iterations`` optimizer steps on one batch of rollouts."""
        config = self.config
        rows_collected = len(buffer)
        uniform = zero_variance_groups(buffer.reward, config.group_size)
        buffer = self.algorithm.advantages(buffer, config.group_size)
        stats: dict[str, float] = {"zero_variance_fraction": float(uniform.float().mean()),
                                   "rows_trained": float(len(buffer)), "rows_collected": float(rows_collected)}
        if len(buffer) == 0:
            return stats  # every group scored uniformly: no signal in this batch
        start = time.perf_counter()
        self.policy.model.train()
        self.algorithm.prepare(self.policy, self.reference, buffer, self.generator, config.micro_batch_size)
        totals: dict[str, list[float]] = {}
        for iteration in range(self.algorithm.config.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            unit = getattr(self.algorithm, "minibatch_unit", None)  # e.g. DPO keeps each pair together
            for minibatch in buffer.minibatches(config.micro_batch_size, generator=self.generator, unit=unit):
                loss, metrics = self.algorithm.backward(self.policy, minibatch, iteration, len(minibatch) / len(buffer))
                for key, value in dict(metrics, loss=loss).items():
                    totals.setdefault(key, []).append(value)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.model.parameters(), config.max_grad_norm)
            totals.setdefault("grad_norm", []).append(float(grad_norm))
            self.optimizer.step()
            if hasattr(self.algorithm, "after_optimizer_step"):  # e.g. PPO steps its value model
                self.algorithm.after_optimizer_step()
        self.policy.model.eval()
        stats.update({key: float(np.mean(values)) for key, values in totals.items()})
        stats["time_update"] = time.perf_counter() - start
        return stats

    # ------------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        if self.config.eval_size == 0:
            return {}
        result = evaluate(
            self.policy, self.eval_env, limit=self.config.eval_size, batch_size=self.config.micro_batch_size,
            **self.config.evaluation.as_kwargs(),
        )
        return {"heldout_accuracy": result.accuracy, "heldout_reward": result.mean_reward}

    # ----------------------------------------------------------------------------------- checkpoints
    def checkpoint_root(self) -> Path:
        return self.output_dir / CHECKPOINT_DIR

    def save_checkpoint(self) -> Path:
        """Write the policy, optimizer and RNG states to ``checkpoints/step-N`` atomically: everything goes
        to a temporary folder that is renamed into place, then the ``latest`` pointer is replaced."""
        root = self.checkpoint_root()
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:06d}"
        tmp = root / f".tmp-step-{self.step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        self.save_policy(tmp / "policy", merged=False)
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "env_rng": self.train_env.np_random.bit_generator.state,
                "algorithm": self.algorithm.state_dict() if hasattr(self.algorithm, "state_dict") else None,
            },
            tmp / "trainer_state.pt",
        )
        state = {"step": self.step, "elapsed_s": self.elapsed(), "config": _jsonable(asdict(self.config))}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(root / LATEST_FILE, final.name + "\n")
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def save_policy(self, path: Path, *, merged: bool) -> None:
        if self.config.lora is None:
            self.policy.save_pretrained(path)
        else:
            save_lora_policy(self.policy, path, merged=merged)

    def latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoint_root() / LATEST_FILE
        if not pointer.is_file():
            return None
        path = self.checkpoint_root() / pointer.read_text().strip()
        return path if path.is_dir() else None

    def load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        if self.config.lora is not None:
            load_lora_weights(self.policy, path / "policy")
        else:
            self.policy.model.load_state_dict(load_file(str(path / "policy" / "model.safetensors")))
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.train_env.np_random.bit_generator.state = state["env_rng"]
        if state.get("algorithm") is not None:
            self.algorithm.load_state_dict(state["algorithm"])
        info = json.loads((path / "trainer_state.json").read_text())
        self.step = info["step"]
        self.elapsed_before_resume = info["elapsed_s"]

    # ------------------------------------------------------------------------------------------ loop
    def elapsed(self) -> float:
        return self.elapsed_before_resume + (time.perf_counter() - self._started)

    def train(self, resume: bool = False) -> dict[str, Any]:
        """Train until ``max_steps`` or ``time_limit_minutes``; returns a summary with the held-out accuracy
        before and after."""
        config = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        logger = MetricsLogger(
            self.output_dir / METRICS_FILE, self.output_dir / "tensorboard" if config.tensorboard else None
        )
        self._started = time.perf_counter()
        if resume:
            checkpoint = self.latest_checkpoint()
            if checkpoint is None:
                raise FileNotFoundError(f"--resume: no checkpoint under {self.checkpoint_root()}")
            self.load_checkpoint(checkpoint)
            logger.truncate_after(self.step)
            self._started = time.perf_counter()
        else:
            if (self.output_dir / METRICS_FILE).exists():
                (self.output_dir / METRICS_FILE).unlink()
            atomic_write_text(self.output_dir / "config.json", json.dumps(_jsonable(asdict(config)), indent=2) + "\n")
            logger.log({"step": 0, "elapsed_s": 0.0, **self.evaluate()})
        history = logger.read()
        initial = next((r for r in history if "heldout_accuracy" in r), {})
        time_limit = None if config.time_limit_minutes is None else 60 * config.time_limit_minutes
        bar = tqdm(total=config.max_steps, initial=self.step, desc="train", unit="step", disable=None if config.progress else True)
        last_eval: dict[str, float] = {}
        try:
            while self.step < config.max_steps and (time_limit is None or self.elapsed() < time_limit):
                buffer, stats = self.collect()
                stats.update(self.update(buffer))
                self.step += 1
                is_last = self.step >= config.max_steps or (time_limit is not None and self.elapsed() >= time_limit)
                record = {"step": self.step, "elapsed_s": round(self.elapsed(), 2), **stats}
                if self.step % config.eval_every == 0 or is_last:
                    last_eval = self.evaluate()
                    record.update(last_eval)
                logger.log(record)
                if self.step % config.save_every == 0:
                    self.save_checkpoint()
                bar.update(1)
                bar.set_postfix(reward=f"{stats['reward_mean']:.3f}", acc=f"{last_eval.get('heldout_accuracy', float('nan')):.3f}")
        finally:
            bar.close()
        self.save_checkpoint()
        self.save_policy(self.output_dir / "final_policy", merged=bool(config.lora and config.lora.merge_on_save))
        logger.close()
        history = logger.read()
        final = [r for r in history if "heldout_accuracy" in r][-1] if config.eval_size else {}
        plot_path = plot_metrics(history, self.output_dir / "curves.png", title=f"{config.algorithm['name']} on {config.env}")
        summary = {
            "steps": self.step,
            "elapsed_s": round(self.elapsed(), 1),
            "heldout_accuracy_before": initial.get("heldout_accuracy"),
            "heldout_accuracy_after": final.get("heldout_accuracy"),
            "plot": str(plot_path),
            "metrics": str(self.output_dir / METRICS_FILE),
        }
        atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary


def plot_metrics(history: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Reward and held-out accuracy against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    train = [r for r in history if "reward_mean" in r]
    axes[0].plot([r["step"] for r in train], [r["reward_mean"] for r in train], label="rollout reward")
    axes[0].plot([r["step"] for r in train], [r["train_accuracy"] for r in train], label="rollout accuracy", alpha=0.7)
    axes[0].set_xlabel("step")
    axes[0].set_title("training rollouts")
    axes[0].legend()
    held = [r for r in history if "heldout_accuracy" in r]
    axes[1].plot([r["step"] for r in held], [r["heldout_accuracy"] for r in held], marker="o", label="accuracy")
    axes[1].plot([r["step"] for r in held], [r["heldout_reward"] for r in held], marker=".", label="reward")
    axes[1].set_xlabel("step")
    axes[1].set_title("held-out, greedy")
    axes[1].legend()
    for axis in axes:
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path)


def save_figure(figure, path: Path) -> Path:
    """Write a matplotlib figure as a PNG atomically (a reader never sees half a file) and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    os.replace(tmp, path)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
