"""LoRA through peft: only adapters train, the reference is the base with adapters off (no second copy),
merged and unmerged checkpoints reload as the trained policy, and bad settings fail with clear errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForMaskedLM

import dare_gym
from dare_gym.core.lora import (
    AdapterDisabledReference,
    LoraSettings,
    adapter_disabled_reference,
    apply_lora,
    load_lora_weights,
    save_lora_policy,
    trainable_parameters,
)
from dare_gym.core.sft import demonstration_batch, masked_diffusion_loss

DIGITS = ["583920", "174602", "90817", "3141592", "271828", "66104"]
PROMPTS = [f"sort {d}\n" for d in DIGITS]
ANSWERS = ["".join(sorted(d)) for d in DIGITS]
GEN = dict(gen_length=8, steps=8, block_length=8, temperature=0.0)


def probe_inputs(policy):
    torch.manual_seed(0)
    batch = demonstration_batch(policy, PROMPTS, ANSWERS, 8)
    noised = batch.input_ids.clone()
    hide = torch.rand(noised[:, batch.prompt_length:].shape) < 0.5
    noised[:, batch.prompt_length:] = noised[:, batch.prompt_length:].masked_fill(hide, policy.mask_token_id)
    return noised, batch.attention_mask


@pytest.fixture(scope="module")
def trained():
    """A LoRA policy after a few SFT steps, with the base logits recorded before LoRA was applied."""
    policy = dare_gym.load_policy("tiny")
    ids, mask = probe_inputs(policy)
    with torch.no_grad():
        base_logits = policy.logits(ids, mask)
    base_weight = policy.model.model.blocks[0].qkv.weight
    apply_lora(policy, LoraSettings(r=4, alpha=8), verbose=False)
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    batch = demonstration_batch(policy, PROMPTS, ANSWERS, 8)
    policy.model.train()
    for _ in range(5):
        loss = masked_diffusion_loss(policy, batch, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.model.eval()
    return dict(policy=policy, ids=ids, mask=mask, base_logits=base_logits, base_weight=base_weight)


def test_apply_lora_trains_only_adapters_and_starts_at_the_base():
    policy = dare_gym.load_policy("tiny")
    ids, mask = probe_inputs(policy)
    with torch.no_grad():
        before = policy.logits(ids, mask)
    base_total = sum(p.numel() for p in policy.model.parameters())
    same = apply_lora(policy, LoraSettings(r=8, alpha=16), verbose=False)
    assert same is policy
    names = {name.rsplit(".", 1)[-1] for name, m in policy.model.named_modules() if hasattr(m, "lora_A")}
    assert names == {"qkv", "out", "gate_up", "down"}  # the default: the blocks' Linear layers, not lm_head
    trainable = {n: p for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    frozen = [n for n, p in policy.model.named_parameters() if not p.requires_grad]
    assert any(n.endswith("qkv.base_layer.weight") for n in frozen) and any("lm_head" in n for n in frozen)
    config = policy.model.config
    blocks, h, inter = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    # r·(in + out) per adapted Linear: qkv h→3h, out h→h, gate_up h→2·inter, down inter→h
    expected = blocks * 8 * ((h + 3 * h) + (h + h) + (h + 2 * inter) + (inter + h))
    assert trainable_parameters(policy) == (expected, base_total + expected)
    with torch.no_grad():
        assert torch.equal(policy.logits(ids, mask), before)  # B starts at zero


def test_training_moves_the_policy_but_not_the_shared_reference(trained):
    policy, ids, mask = trained["policy"], trained["ids"], trained["mask"]
    with torch.no_grad():
        lora_logits = policy.logits(ids, mask)
    assert not torch.allclose(lora_logits, trained["base_logits"], atol=1e-3)
    reference = adapter_disabled_reference(policy)
    assert isinstance(reference, AdapterDisabledReference)
    ref_logits = reference.logits(ids, mask)
    assert torch.equal(ref_logits, trained["base_logits"])
    assert not ref_logits.requires_grad
    # The reference is a view: the very same modules and storage, no second copy of the weights.
    assert reference.model is policy.model
    base_layer = policy.model.base_model.model.model.blocks[0].qkv.base_layer
    assert base_layer.weight.data_ptr() == trained["base_weight"].data_ptr()
    ref_params = {p.data_ptr() for p in reference.model.parameters()}
    assert ref_params == {p.data_ptr() for p in policy.model.parameters()}
    assert (reference.device, reference.mask_token_id, reference.tokenizer, reference.family) == (
        policy.device, policy.mask_token_id, policy.tokenizer, policy.family)
    # Adapters are back on afterwards, the training mode is restored, and greedy sampling works on both.
    policy.model.train()
    reference.logits(ids, mask)
    assert policy.model.training
    policy.model.eval()
    with torch.no_grad():
        assert torch.equal(policy.logits(ids, mask), lora_logits)
    assert [c.text for c in reference.generate(PROMPTS[:2], **GEN)] == [
        c.text for c in dare_gym.load_policy("tiny").generate(PROMPTS[:2], **GEN)]


def test_merged_and_unmerged_checkpoints_reload_as_the_trained_policy(trained, tmp_path):
    from peft import PeftModel

    policy, ids, mask = trained["policy"], trained["ids"], trained["mask"]
    with torch.no_grad():
        expected = policy.logits(ids, mask)
    expected_text = [c.text for c in policy.generate(PROMPTS, **GEN)]

    save_lora_policy(policy, tmp_path / "adapter", merged=False)
    save_lora_policy(policy, tmp_path / "merged", merged=True)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert hasattr(policy.model.base_model.model.model.blocks[0].qkv, "lora_A")  # training model untouched

    def logits_of(model):
        with torch.no_grad():
            return model.eval()(input_ids=ids, attention_mask=mask).logits

    merged_hf = AutoModelForMaskedLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(logits_of(merged_hf), expected, atol=1e-5)
    base = AutoModelForMaskedLM.from_pretrained(dare_gym.core.policy.TINY_CHECKPOINT)
    assert torch.allclose(logits_of(PeftModel.from_pretrained(base, tmp_path / "adapter")), expected, atol=1e-5)

    for folder in ("merged", "adapter"):
        loaded = dare_gym.load_policy(tmp_path / folder)
        assert isinstance(loaded.model, PeftModel) == (folder == "adapter")
        with torch.no_grad():
            assert torch.allclose(loaded.logits(ids, mask), expected, atol=1e-5), folder
        assert [c.text for c in loaded.generate(PROMPTS, **GEN)] == expected_text, folder
    assert trainable_parameters(loaded)[0] == trainable_parameters(policy)[0]  # resumable adapter

    # Resuming: a fresh LoRA policy takes the saved adapter weights in place.
    fresh = apply_lora(dare_gym.load_policy("tiny"), LoraSettings(r=4, alpha=8), verbose=False)
    load_lora_weights(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh.logits(ids, mask), expected)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(r=0), "r"),
        (dict(r=2.5), "r"),
        (dict(alpha=0), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(target_modules=[]), "target_modules"),
        (dict(target_modules="qkv"), "target_modules"),
        (dict(bias="some"), "bias"),
        (dict(merge_on_save="yes"), "merge_on_save"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"LoraSettings\.{field}\b"):
        LoraSettings(**kwargs)


def test_unknown_target_module_and_unknown_key_are_clear_errors():
    policy = dare_gym.load_policy("tiny")
    with pytest.raises(ValueError, match=r"target_modules.*'q_proj'.*qkv"):
        apply_lora(policy, LoraSettings(target_modules=["qkv", "q_proj"]), verbose=False)
    assert not hasattr(policy.model, "peft_config")  # nothing was wrapped
    with pytest.raises(ValueError, match="rank"):
        LoraSettings.from_dict({"rank": 4})
    assert LoraSettings.from_dict({"r": 4, "target_modules": "all-linear"}).r == 4
    apply_lora(policy, LoraSettings(target_modules="all-linear"), verbose=False)
    adapted = {n.rsplit(".", 1)[-1] for n, m in policy.model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"qkv", "out", "gate_up", "down"}  # peft's all-linear leaves the output layer alone
    with pytest.raises(ValueError, match="already"):
        apply_lora(policy, LoraSettings(), verbose=False)


def test_trainer_trains_lora_adapters_with_the_base_as_reference_and_resumes(tmp_path):
    import json

    from dare_gym.core.config import load_config
    from dare_gym.core.lora import AdapterDisabledReference
    from dare_gym.train.trainer import TrainConfig, Trainer

    def config(steps):
        return load_config(TrainConfig, None, [
            f"output_dir={tmp_path / 'run'}", "prompts_per_step=4", "group_size=4", f"max_steps={steps}",
            "eval_size=0", "save_every=1", "progress=false", "learning_rate=1e-3",
            'algorithm={"name": "d1", "estimator": "random_ratio", "num_iterations": 2, "beta": 0.04,'
            ' "scale_rewards": "group"}',
            'lora={"r": 4, "alpha": 8}',
        ])

    trainer = Trainer(config(2))
    assert isinstance(trainer.reference, AdapterDisabledReference)
    base = {n: p.detach().clone() for n, p in trainer.policy.model.named_parameters() if "lora" not in n}
    trainer.train()
    for name, parameter in trainer.policy.model.named_parameters():
        if "lora" not in name:
            assert torch.equal(parameter, base[name]), f"base weight {name} changed"
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in trainer.policy.model.named_parameters())
    assert (tmp_path / "run" / "final_policy" / "adapter_config.json").exists()
    resumed = Trainer(config(3))
    resumed.train(resume=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3] and resumed.step == 3
    again = dare_gym.load_policy(tmp_path / "run" / "final_policy")
    prompts = ["sort 583920\n", "sort 112233\n"]
    assert [c.text for c in again.generate(prompts)] == [c.text for c in resumed.policy.generate(prompts)]
