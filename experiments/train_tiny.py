"""Train the built-in tiny dLLMs from scratch with diffusion SFT on the embedded tasks.

This is the script that produced the built-in checkpoints (``dare_gym.load_policy(name)``). Reproduce them with:

    python experiments/train_tiny.py                        # tiny: digit sorting (the default task)
    python experiments/train_tiny.py --policy tiny-long     # tiny-long: group sorting, 67-token answers
    python experiments/train_tiny.py --policy tiny-block    # tiny-block: group sorting, block-causal (blocks of 4)
    python experiments/train_tiny.py --policy tiny-moe      # tiny-moe: tiny-block's task on the LLaDA2 MoE architecture

``tiny`` stops on purpose while the model is only partly trained (held-out greedy accuracy around 40%), so that
reinforcement learning from the checker has room to show a gain. ``tiny-long`` and ``tiny-block`` exist so that
samplers' speed-versus-accuracy tables mean something on a CPU (``experiments/bench_rollout.py``): each trains
for at most two minutes on 2 CPU cores, ``tiny-block`` with SDAR's block-diffusion objective (ALGORITHMS.md §B).
``tiny-moe`` is the LLaDA2 architecture (:mod:`dare_gym.models.llada2`: a dense first layer, then MoE layers of 8
routed experts with a grouped float32 router and a shared expert) at the size of the others, trained like
``tiny-block``, so that the algorithms learn on a block-causal mixture of experts in CI.
Each folder's ``training.json`` records the settings, the time taken and the held-out score.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import dare_gym
from dare_gym.models.llada2 import LLaDA2MoeConfig, LLaDA2MoeModelLM
from dare_gym.train.evaluation import evaluate
from dare_gym.models.tiny import TinyDLLMConfig, TinyDLLMForMaskedLM, count_parameters
from dare_gym.models.tokenizer import build_char_tokenizer
from dare_gym.core.policy import BUILTIN_POLICIES, DiffusionPolicy
from dare_gym.core.sft import train_on_demonstrations

GENERATION = dict(gen_length=8, steps=8, block_length=8, temperature=0.0, remasking="low_confidence")
LONG_GENERATION = dict(gen_length=72, steps=72, block_length=8, temperature=0.0, remasking="low_confidence")
BLOCK_GENERATION = dict(sampler="block_diffusion", gen_length=72, steps_per_block=4, temperature=0.0,
                        remasking_strategy="low_confidence_static")

PRESETS = {
    # the task, optimizer steps, batch size, learning rate, held-out problems, block size, sampler defaults
    "tiny": dict(env="digitsort-v0", steps=200, batch_size=64, lr=1e-3, eval_size=500, block_size=None,
                 generation=GENERATION),
    "tiny-long": dict(env="groupsort-v0", steps=540, batch_size=16, lr=2e-3, eval_size=200, block_size=None,
                      generation=LONG_GENERATION),
    "tiny-block": dict(env="groupsort-v0", steps=540, batch_size=16, lr=2e-3, eval_size=200, block_size=4,
                       generation=BLOCK_GENERATION),
    "tiny-moe": dict(env="groupsort-v0", steps=540, batch_size=16, lr=2e-3, eval_size=200, block_size=4,
                     generation=BLOCK_GENERATION, architecture="llada2"),
}
# tiny-moe's LLaDA2 shape: a dense first layer, then MoE layers of 8 experts in 2 groups (the better group's
# experts are candidates, 2 chosen per token) plus one shared expert. Heads of 64 with half of them rotary, as
# LLaDA2 does, at θ = 10,000: 32 rotary dimensions a head, as tiny-block's heads have. With 16 rotary dimensions
# (heads of 32) at LLaDA2's θ = 600,000 this task's position-exact copying learnt at half the speed: block SFT
# loss 1.47 against tiny-block's 0.63 after 200 steps.
MOE_SHAPE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512,
                 moe_intermediate_size=128, num_experts=8, num_shared_experts=1, num_experts_per_tok=2, n_group=2,
                 topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                 partial_rotary_factor=0.5, rope_theta=10000.0, max_position_embeddings=256)


def build_moe_policy(seed: int, layers: int, *, block_size: int, generation: dict) -> DiffusionPolicy:
    """A random LLaDA2-architecture policy (:data:`MOE_SHAPE`) with the character tokenizer."""
    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    config = LLaDA2MoeConfig(vocab_size=len(tokenizer), num_hidden_layers=layers, block_size=block_size,
                             mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **MOE_SHAPE)
    return DiffusionPolicy(LLaDA2MoeModelLM(config), tokenizer, family="llada2", generation_defaults=dict(generation))


def build_policy(seed: int, hidden_size: int, layers: int, heads: int, *, block_size: int | None = None,
                 generation: dict | None = None) -> DiffusionPolicy:
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
        block_size=block_size,
    )
    model = TinyDLLMForMaskedLM(config)
    return DiffusionPolicy(model, tokenizer, family="tiny", generation_defaults=dict(generation or GENERATION))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", choices=sorted(PRESETS), default="tiny", help="which built-in policy to train")
    parser.add_argument("--output", type=Path, help="default: the built-in policy's folder in the package")
    parser.add_argument("--env", help="default: the preset's task")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-size", type=int, help="held-out problems scored at the end (default: the preset's)")
    args = parser.parse_args()
    preset = PRESETS[args.policy]
    for name in ("env", "steps", "batch_size", "lr", "eval_size"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    args.output = args.output or BUILTIN_POLICIES[args.policy]
    generation = preset["generation"]

    if preset.get("architecture") == "llada2":
        policy = build_moe_policy(args.seed, args.layers, block_size=preset["block_size"], generation=generation)
    else:
        policy = build_policy(args.seed, args.hidden_size, args.layers, args.heads, block_size=preset["block_size"],
                              generation=generation)
    print(f"{args.policy}: {count_parameters(policy.model):,} parameters, block size {preset['block_size']}")
    train_env = dare_gym.make(args.env, split="train")
    test_env = dare_gym.make(args.env, split="test")
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    train_on_demonstrations(
        policy, train_env, answer_length=generation["gen_length"], learning_rate=args.lr,
        batch_size=args.batch_size, max_steps=args.steps, generator=generator,
    )
    seconds = time.time() - start
    result = evaluate(policy, test_env, limit=args.eval_size)
    print(f"held-out greedy accuracy {result.accuracy:.3f}, mean reward {result.mean_reward:.3f} after {seconds:.0f} s")
    policy.model.eval()
    policy.save_pretrained(args.output)
    (args.output / "training.json").write_text(
        json.dumps(
            dict(vars(args), output=str(args.output), block_size=preset["block_size"], generation=generation,
                 architecture=preset.get("architecture", "tiny"),
                 **({"moe_shape": MOE_SHAPE} if preset.get("architecture") == "llada2" else {}),
                 seconds=round(seconds, 1), parameters=count_parameters(policy.model),
                 heldout_accuracy=result.accuracy, heldout_mean_reward=result.mean_reward),
            indent=2,
        ) + "\n"
    )
    print(f"saved to {args.output}")


if __name__ == "__main__":
    main()
