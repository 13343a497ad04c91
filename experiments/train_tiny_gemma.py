"""Train the built-in ``tiny-gemma`` policy: a tiny DiffusionGemma (transformers' native
``DiffusionGemmaForBlockDiffusion``: encoder + decoder sharing 2 MoE layers of 4 experts, one canvas of 8 tokens)
from scratch on digit sorting, with DiffusionGemma's own SFT objective.

    python experiments/train_tiny_gemma.py                  # writes dare_gym/models/tiny_gemma_checkpoint

The objective is the one NeMo's DiffusionGemma recipe trains (``dare_gym.core.uniform_estimators.uniform_sft_loss``):
t ~ U(0.001, 1) per example, every answer token (EOS padding included) replaced by a uniform random id with
probability t, mean cross-entropy of the clean answer over all 8 positions, and two-pass self-conditioning for a
random half of the examples (the sampler conditions every step after the first on the previous step's logits, so
that path must be trained). Like ``tiny``, it stops on purpose while the model is only partly trained (held-out
greedy accuracy well below 100%), so that RL from the checker has room to show a gain. ``training.json`` records
the settings, the time taken and the held-out score; the script reproduces the weights exactly on one machine
(one thread, fixed seed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import dare_gym
from dare_gym.train.evaluation import evaluate
from dare_gym.models.diffusion_gemma import build_tokenizer, standin_config, standin_generation_config
from dare_gym.core.policy import BUILTIN_POLICIES, DiffusionPolicy
from dare_gym.core.sft import demonstration_batch
from dare_gym.core.uniform_estimators import sft_noise, uniform_sft_loss

# greedy proposals; the checkpoint's schedule (8 steps, t 0.8 -> 0.4, entropy bound 0.1) does the rest
GENERATION = dict(sampler="diffusion_gemma", gen_length=8, temperature=0.0)


def build_policy(seed: int, hidden_size: int, layers: int, experts: int, steps: int) -> DiffusionPolicy:
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None  # plain prompts, as the other built-in tiny policies read them
    config = standin_config(len(tokenizer), hidden_size=hidden_size, layers=layers, experts=experts, canvas_length=8)
    model = DiffusionGemmaForBlockDiffusion(config)
    model.generation_config = standin_generation_config(max_denoising_steps=steps)
    return DiffusionPolicy(model, tokenizer, family="diffusion_gemma", generation_defaults=dict(GENERATION))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=BUILTIN_POLICIES["tiny-gemma"])
    parser.add_argument("--env", default="digitsort-v0")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--hidden-size", type=int, default=96)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--denoising-steps", type=int, default=8, help="the checkpoint's max_denoising_steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: reproducible weights)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    policy = build_policy(args.seed, args.hidden_size, args.layers, args.experts, args.denoising_steps)
    parameters = sum(p.numel() for p in policy.model.parameters())
    print(f"tiny-gemma: {parameters:,} parameters")
    train_env = dare_gym.make(args.env, split="train")
    test_env = dare_gym.make(args.env, split="test")
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=args.lr, weight_decay=0.0)
    policy.model.train()
    start = time.time()
    for step in range(args.steps):
        records = [train_env.record(int(i)) for i in torch.randint(0, 2**31 - 1, (args.batch_size,), generator=generator)]
        batch = demonstration_batch(policy, [train_env.prompt(r) for r in records],
                                    [train_env.demonstration(r) for r in records], GENERATION["gen_length"])
        answers = batch.completion_ids
        present = torch.ones_like(answers, dtype=torch.bool)
        noise = sft_noise(answers, present, policy.family.vocab_size(policy.model.config), generator)
        loss = uniform_sft_loss(policy, batch.prompt_ids, batch.prompt_attention, answers, present, noise["noisy"],
                                noise["self_conditioning"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}: loss {loss.item():.3f} ({time.time() - start:.0f} s)")
    seconds = time.time() - start
    policy.model.eval()
    result = evaluate(policy, test_env, limit=args.eval_size)
    print(f"held-out greedy accuracy {result.accuracy:.3f}, mean reward {result.mean_reward:.3f} after {seconds:.0f} s")
    policy.save_pretrained(args.output)
    (args.output / "training.json").write_text(json.dumps(
        dict(vars(args), output=str(args.output), generation=GENERATION, seconds=round(seconds, 1),
             parameters=parameters, heldout_accuracy=result.accuracy, heldout_mean_reward=result.mean_reward),
        indent=2, default=str) + "\n")
    print(f"saved to {args.output}")


if __name__ == "__main__":
    main()
