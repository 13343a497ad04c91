"""The built-in tiny dLLM and its tokenizer: Auto-class round trips, padding invariance, SFT from scratch."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

import dare_gym
from dare_gym.models.tiny import TinyDLLMConfig, TinyDLLMForMaskedLM, TinyDLLMModel
from dare_gym.models.tokenizer import build_char_tokenizer
from dare_gym.core.policy import BUILTIN_POLICIES, DiffusionPolicy
from dare_gym.core.sft import train_on_demonstrations


def small_model(seed=0) -> TinyDLLMForMaskedLM:
    torch.manual_seed(seed)
    return TinyDLLMForMaskedLM(TinyDLLMConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=64)).eval()


def test_model_and_tokenizer_round_trip_through_auto_classes(tmp_path):
    model, tokenizer = small_model(), build_char_tokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "dare_tiny_dllm"
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, TinyDLLMForMaskedLM)
    assert isinstance(AutoModel.from_pretrained(tmp_path), TinyDLLMModel)
    ids = torch.randint(0, 101, (2, 9))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = "sort 583920\nJanet's 16 eggs: $2 each!"
    assert loaded_tokenizer.decode(loaded_tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert loaded_tokenizer.mask_token_id == tokenizer.mask_token_id == 3
    assert loaded_tokenizer("é", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id]


def test_left_padding_does_not_change_real_token_logits():
    model = small_model(1)
    ids = torch.randint(5, 101, (1, 7))
    alone = model(ids).logits
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    with_padding = model(padded, attention_mask=mask).logits[:, 4:]
    assert torch.allclose(alone, with_padding, atol=1e-5)
    # Without the mask the pads are attended and shift positions: the logits change, so the mask is live.
    assert not torch.allclose(alone, model(padded).logits[:, 4:], atol=1e-3)


def test_attention_is_bidirectional():
    model = small_model(2)
    ids = torch.randint(5, 101, (1, 6))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 101
    assert not torch.allclose(model(ids).logits[0, 0], model(changed).logits[0, 0])


def test_load_policy_tiny_is_the_shipped_checkpoint():
    policy = dare_gym.load_policy("tiny")
    assert policy.mask_token_id == policy.tokenizer.mask_token_id
    assert policy.family.name == "tiny"
    assert policy.generation_defaults["gen_length"] == 8
    size = sum(p.stat().st_size for folder in BUILTIN_POLICIES.values() for p in folder.iterdir())
    assert size <= 20 * 2**20  # every built-in checkpoint together
    out = policy.generate(["sort 907143\n"])[0]
    assert len(out.completion_ids) == 8 and out.text.isdigit()


def test_policy_save_and_load_round_trip(tmp_path, tiny_policy):
    tiny_policy.save_pretrained(tmp_path / "p")
    again = dare_gym.load_policy(tmp_path / "p")
    assert again.generation_defaults == tiny_policy.generation_defaults
    prompts = ["sort 555123\n", "sort 908172\n"]
    assert [c.text for c in again.generate(prompts)] == [c.text for c in tiny_policy.generate(prompts)]


def test_masked_diffusion_sft_trains_the_model_from_scratch():
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    config = TinyDLLMConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=256, mask_token_id=tokenizer.mask_token_id)
    policy = DiffusionPolicy(TinyDLLMForMaskedLM(config), tokenizer, family="tiny",
                             generation_defaults=dict(gen_length=8, steps=8, block_length=8))
    env = dare_gym.make("digitsort-v0")
    losses = []
    train_on_demonstrations(policy, env, answer_length=8, learning_rate=2e-3, batch_size=32, max_steps=150,
                            generator=torch.Generator().manual_seed(0),
                            callback=lambda step, elapsed, loss: losses.append(loss), progress=False)
    assert sum(losses[:10]) / 10 > 3.0 and sum(losses[-10:]) / 10 < 1.2
    test = dare_gym.make("digitsort-v0", split="test")
    prompts = [test.reset(options={"index": i})[0] for i in range(50)]
    texts = [c.text for c in policy.generate(prompts)]
    # It has learnt the format and most of the content: six digits, mostly in sorted order.
    assert sum(t.isdigit() and len(t) == 6 for t in texts) >= 40
    assert sum(list(t) == sorted(t) for t in texts) >= 25


@pytest.mark.parametrize("name, block_size, sampler", [("tiny-long", None, "llada"),
                                                       ("tiny-block", 4, "block_diffusion")])
def test_builtin_long_task_policies_sort_held_out_groups(name, block_size, sampler):
    """tiny-long and tiny-block (experiments/train_tiny.py) were trained on groupsort's 67-character answers:
    their default sampler gets most characters of held-out problems right, and an untrained model does not."""
    policy = dare_gym.load_policy(name)
    assert policy.block_size == block_size and policy.default_sampler == sampler
    assert sum(p.numel() for p in policy.model.parameters()) < 1_000_000
    env = dare_gym.make("groupsort-v0", split="test")
    records = [env.record(i) for i in range(16)]
    completions = policy.generate([env.prompt(r) for r in records])
    char_match = [sum(a == b for a, b in zip(c.text.strip(), r["gold"])) / len(r["gold"])
                  for c, r in zip(completions, records)]
    assert sum(char_match) / len(char_match) > 0.9, char_match
    assert all(len(c.text.strip()) == env.answer_chars for c in completions)
