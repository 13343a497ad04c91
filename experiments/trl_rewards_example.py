"""dare_gym rewards as reward functions of TRL's ``GRPOTrainer``.

TRL calls a reward function as ``fn(prompts, completions, **columns) -> list[float]``, the dataset's other
columns passed by name. :func:`as_trl_reward` wraps any dare_gym reward spec (a registered name, a callable, a
weighted list) into one: each row's columns become the record the reward reads (gold answer included), and the
reward runs with dare_gym's safety (errors score 0, optional hard time limit per completion). :func:`env_dataset`
turns an env's split into the prompt-plus-record rows TRL trains on.

TRL trains autoregressive models, so this example builds a tiny random GPT-2 on the tiny dLLM's character
tokenizer (nothing is downloaded) and runs a few GRPO steps on digit sorting; swap in any causal LM checkpoint::

    python experiments/trl_rewards_example.py --steps 1 --output runs/trl-example
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Mapping

import dare_gym
from dare_gym.rewards import resolve_reward

TRL_EXTRAS = {"completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}
"""Keyword arguments TRL passes beside the dataset's columns; they are not part of a record."""


def as_trl_reward(spec, *, name: str | None = None, timeout_s: float | None = None):
    """A TRL reward function scoring completions with the dare_gym reward ``spec``.

    Completions may be strings or, for conversational datasets, message lists (the last message's content is
    scored). The function's ``__name__`` (``name``, default the reward's) is what TRL logs it as."""
    reward = resolve_reward(spec, timeout_s=timeout_s)

    def reward_fn(prompts, completions, **columns) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        columns = {key: values for key, values in columns.items() if key not in TRL_EXTRAS}
        records = [{key: values[i] for key, values in columns.items()} for i in range(len(texts))]
        prompt_texts = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
        return [result.total for result in reward.score_many(texts, records, prompt_texts)]

    reward_fn.__name__ = name or "_".join(term for term, _, _ in reward.terms)
    return reward_fn


def env_dataset(env_id: str, split: str, size: int, **env_kwargs):
    """The first ``size`` records of an env's split as a ``datasets.Dataset`` with a ``prompt`` column and the
    record's fields (TRL hands them to the reward functions)."""
    from datasets import Dataset

    env = dare_gym.make(env_id, split=split, **env_kwargs)
    rows = []
    for index in range(size):
        record: Mapping = env.record(index)
        rows.append({"prompt": env.prompt(record), **record})
    return Dataset.from_list(rows)


def tiny_causal_lm(seed: int = 0):
    """A small random GPT-2 on the tiny model's character tokenizer (left padding, as TRL generates)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from dare_gym.models.tokenizer import build_char_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config), tokenizer


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--env", default="digitsort-v0")
    parser.add_argument("--output", default="runs/trl-example")
    args = parser.parse_args(argv)

    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = tiny_causal_lm()
    dataset = env_dataset(args.env, "train", 16)
    # the env's own checker plus a partial-credit term, both dare_gym rewards
    rewards = [as_trl_reward("exact_match"), as_trl_reward([("char_match", 1.0)], name="char_match")]
    config = GRPOConfig(output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=4,
                        num_generations=4, max_completion_length=8, learning_rate=1e-3, logging_steps=1,
                        report_to=[], use_cpu=True, save_strategy="no", seed=0, temperature=1.0)
    trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=config, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "reward" in entry]
    summary = {"steps": trainer.state.global_step, "log": logged}
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "trl_log.json").write_text(json.dumps(summary, indent=2) + "\n")
    for entry in logged:
        print(f"step {entry.get('step')}: reward {entry['reward']:.3f} "
              + " ".join(f"{k.split('/')[-2]} {v:.3f}" for k, v in entry.items() if k.startswith("rewards/")
                         and k.endswith("/mean")))
    return summary


if __name__ == "__main__":
    main()
