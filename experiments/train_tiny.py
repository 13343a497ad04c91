"""Train the built-in tiny dLLM from scratch with masked-diffusion SFT on the embedded default task.

This is the script that produced ``dare_gym/models/tiny_checkpoint`` (the policy ``load_policy("tiny")``
loads). Reproduce it with:

    python experiments/train_tiny.py            # writes dare_gym/models/tiny_checkpoint

It stops on purpose while the model is only partly trained (held-out greedy accuracy around a half), so that
reinforcement learning from the checker has room to show a gain.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import dare_gym
from dare_gym.evaluation import evaluate
from dare_gym.models.tiny import TinyDLLMConfig, TinyDLLMForMaskedLM, count_parameters
from dare_gym.models.tokenizer import build_char_tokenizer
from dare_gym.policy import TINY_CHECKPOINT, DiffusionPolicy
from dare_gym.sft import train_on_demonstrations

GENERATION = dict(gen_length=8, steps=8, block_length=8, temperature=0.0, remasking="low_confidence")


def build_policy(seed: int, hidden_size: int, layers: int, heads: int) -> DiffusionPolicy:
    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    config = TinyDLLMConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden_size,
        mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = TinyDLLMForMaskedLM(config)
    return DiffusionPolicy(model, tokenizer, family="tiny", generation_defaults=GENERATION)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=TINY_CHECKPOINT)
    parser.add_argument("--env", default="digitsort-v0")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-size", type=int, default=500)
    args = parser.parse_args()

    policy = build_policy(args.seed, args.hidden_size, args.layers, args.heads)
    print(f"tiny dLLM: {count_parameters(policy.model):,} parameters")
    train_env = dare_gym.make(args.env, split="train")
    test_env = dare_gym.make(args.env, split="test")
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    train_on_demonstrations(
        policy, train_env, answer_length=GENERATION["gen_length"], learning_rate=args.lr,
        batch_size=args.batch_size, max_steps=args.steps, generator=generator,
    )
    seconds = time.time() - start
    result = evaluate(policy, test_env, limit=args.eval_size)
    print(f"held-out greedy accuracy {result.accuracy:.3f}, mean reward {result.mean_reward:.3f} after {seconds:.0f} s")
    policy.model.eval()
    policy.save_pretrained(args.output)
    (args.output / "training.json").write_text(
        json.dumps(
            dict(vars(args), output=str(args.output), seconds=round(seconds, 1), parameters=count_parameters(policy.model),
                 heldout_accuracy=result.accuracy, heldout_mean_reward=result.mean_reward),
            indent=2,
        ) + "\n"
    )
    print(f"saved to {args.output}")


if __name__ == "__main__":
    main()
