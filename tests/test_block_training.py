"""Block-diffusion training (ALGORITHMS.md §B): the doubled [x_t ; x_0] forward scores every noisy block as
block-by-block decoding sees it, on the block-causal tiny model and the SDAR stand-in, batched with left
padding; the block-diffusion SFT loss and its noise; SFT choosing the objective by the policy's block size."""

from __future__ import annotations

import pytest
import torch

import dare_gym
from dare_gym.core.buffer import left_pad
from dare_gym.models.families import get_family, noisy_clean_attention_inputs
from dare_gym.models.standin import build_standin
from dare_gym.models.tiny import TinyDLLMConfig, TinyDLLMForMaskedLM
from dare_gym.models.tokenizer import build_char_tokenizer
from dare_gym.core.policy import DiffusionPolicy
from dare_gym.core.sft import (
    block_diffusion_sft_loss,
    demonstration_batch,
    masked_diffusion_loss,
    masked_diffusion_sft_loss,
    sample_answer_masks,
    train_on_demonstrations,
)

ROW_LENGTHS = (13, 6, 10, 3)  # real tokens per row: different lengths, so the batch is left-padded


def tiny_block_policy(block_size: int | None = 4, seed: int = 0) -> DiffusionPolicy:
    """A random tiny model, block-causal with blocks of ``block_size`` (None: bidirectional)."""
    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    config = TinyDLLMConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, initializer_range=0.5, mask_token_id=tokenizer.mask_token_id,
                            block_size=block_size)
    return DiffusionPolicy(TinyDLLMForMaskedLM(config).eval(), tokenizer, family="tiny")


def sdar_standin_policy(folder) -> DiffusionPolicy:
    return dare_gym.load_policy(build_standin("sdar", folder))


def left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad([torch.tensor(row, dtype=torch.long) for row in rows], pad)


def noisy_and_clean_rows(vocab: int, mask_id: int, seed: int = 0):
    """Random clean rows and noisy copies (about half of the tokens masked, some others replaced)."""
    generator = torch.Generator().manual_seed(seed)
    clean = [torch.randint(5, vocab, (n,), generator=generator) for n in ROW_LENGTHS]
    noisy = []
    for row in clean:
        draw = torch.rand(len(row), generator=generator)
        noisy.append(torch.where(draw < 0.5, mask_id, torch.where(draw < 0.6, (row + 1) % vocab, row)))
    return [r.tolist() for r in clean], [r.tolist() for r in noisy]


@pytest.fixture(params=["tiny", "sdar"])
def block_policy(request, tmp_path):
    return tiny_block_policy() if request.param == "tiny" else sdar_standin_policy(tmp_path / "sdar")


def test_each_noisy_block_sees_what_block_decoding_sees(block_policy):
    """Noisy block i of the doubled forward == a plain block-causal forward of [clean blocks < i, noisy block i],
    for every block of every row of a left-padded batch."""
    policy, block = block_policy, block_policy.block_size
    assert block == 4
    vocab = policy.model.config.vocab_size
    clean_rows, noisy_rows = noisy_and_clean_rows(vocab, policy.mask_token_id)
    clean, mask = left_padded(clean_rows)
    noisy, _ = left_padded(noisy_rows)
    with torch.no_grad():
        doubled = policy.family.noisy_clean_forward(policy.model, noisy, clean, mask, block_size=block)
    assert doubled.shape == (*noisy.shape, vocab)
    width = noisy.shape[1]
    checked = 0
    for i in range(-(-max(ROW_LENGTHS) // block)):
        # What decoding block i sees: the finished (clean) blocks before it, then block i as it is now.
        rows = [c[: i * block] + n[i * block:(i + 1) * block] for c, n in zip(clean_rows, noisy_rows)]
        ids, row_mask = left_padded(rows)
        with torch.no_grad():
            plain = policy.family.forward(policy.model, ids, row_mask, block_size=block)
        for row, length in enumerate(ROW_LENGTHS):
            size = min(block, length - i * block)
            if size <= 0:
                continue
            start = width - length + i * block  # the block's first column in the doubled batch
            expected = plain[row, ids.shape[1] - size:]
            torch.testing.assert_close(doubled[row, start:start + size], expected, atol=2e-5, rtol=1e-4)
            checked += 1
    assert checked == sum(-(-n // block) for n in ROW_LENGTHS)


def test_the_clean_context_is_what_makes_the_difference(block_policy):
    """A plain block-causal forward of the noisy sequence (noisy blocks < i as context) differs from the doubled
    forward beyond block 0, and the first block (no context) agrees: the clean copy is live."""
    policy, block = block_policy, block_policy.block_size
    clean_rows, noisy_rows = noisy_and_clean_rows(policy.model.config.vocab_size, policy.mask_token_id, seed=1)
    clean, mask = left_padded(clean_rows)
    noisy, _ = left_padded(noisy_rows)
    with torch.no_grad():
        doubled = policy.family.noisy_clean_forward(policy.model, noisy, clean, mask, block_size=block)
        plain_noisy = policy.family.forward(policy.model, noisy, mask, block_size=block)
    row, length = 0, ROW_LENGTHS[0]
    first = noisy.shape[1] - length
    torch.testing.assert_close(doubled[row, first:first + block], plain_noisy[row, first:first + block],
                               atol=2e-5, rtol=1e-4)
    assert not torch.allclose(doubled[row, first + block:], plain_noisy[row, first + block:], atol=1e-3)


def test_logits_to_keep_returns_the_noisy_answer_positions(block_policy):
    policy = block_policy
    clean_rows, noisy_rows = noisy_and_clean_rows(policy.model.config.vocab_size, policy.mask_token_id, seed=2)
    clean, mask = left_padded(clean_rows)
    noisy, _ = left_padded(noisy_rows)
    with torch.no_grad():
        everything = policy.family.noisy_clean_forward(policy.model, noisy, clean, mask, block_size=4)
        last = policy.family.noisy_clean_forward(policy.model, noisy, clean, mask, block_size=4, logits_to_keep=3)
    torch.testing.assert_close(last, everything[:, -3:])


def test_doubled_mask_on_a_left_padded_row():
    """One row, two pads then five real tokens, blocks of 2: the three parts of §B's mask, pads hidden."""
    mask, positions = noisy_clean_attention_inputs(torch.tensor([[0, 0, 1, 1, 1, 1, 1]]), block_size=2,
                                                   dtype=torch.float32)
    assert positions.tolist() == [[0, 0, 0, 1, 2, 3, 4]]
    visible = (mask[0, 0] == 0).int()
    clean_to_clean, clean_to_noisy = visible[:7, :7], visible[:7, 7:]
    noisy_to_clean, noisy_to_noisy = visible[7:, :7], visible[7:, 7:]
    assert clean_to_noisy.sum() == 0
    # Real token at position 2 (column 4, block 1): clean blocks 0-1; from the noisy copy, clean block 0 only
    # and its own noisy block.
    assert clean_to_clean[4].tolist() == [0, 0, 1, 1, 1, 1, 0]
    assert noisy_to_clean[4].tolist() == [0, 0, 1, 1, 0, 0, 0]
    assert noisy_to_noisy[4].tolist() == [0, 0, 0, 0, 1, 1, 0]
    assert noisy_to_noisy[2].tolist() == [0, 0, 1, 1, 0, 0, 0] and noisy_to_clean[2].sum() == 0


def test_bad_input_is_named():
    policy = tiny_block_policy()
    ids = torch.randint(5, 50, (2, 6))
    family = policy.family
    with pytest.raises(ValueError, match="block_size must be a positive integer, got 0"):
        family.noisy_clean_forward(policy.model, ids, ids, None, block_size=0)
    with pytest.raises(ValueError, match=r"noisy_ids \(2, 6\) and clean_ids \(2, 5\)"):
        family.noisy_clean_forward(policy.model, ids, ids[:, :5], None, block_size=4)
    with pytest.raises(ValueError, match="logits_to_keep must be in"):
        family.noisy_clean_forward(policy.model, ids, ids, None, block_size=4, logits_to_keep=7)
    with pytest.raises(ValueError, match="shifted"):
        get_family("dream").noisy_clean_forward(policy.model, ids, ids, None, block_size=4)


def test_block_diffusion_sft_loss_divides_by_the_batch_answer_tokens():
    """§A's worked example (L_ans 4, t 0.5, masked CE 2.0 and 1.0: 1.5) is a one-row batch of §B too; with a
    second row the two differ: §B sums over rows and divides by all answer tokens."""
    targets = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    logits = torch.full((2, 4, 4), -50.0)
    ce = torch.tensor([[2.0, 1.0, 0.7, 0.7], [0.5, 0.5, 0.5, 4.0]])
    for row in range(2):  # two-class rows whose cross-entropy at the target is exactly ce
        for k in range(4):
            logits[row, k, targets[row, k]] = 0.0
            logits[row, k, (targets[row, k] + 1) % 4] = torch.log(torch.expm1(ce[row, k]))
    masked = torch.tensor([[True, True, False, False], [False, False, False, True]])
    p_mask, lengths = torch.tensor([0.5, 0.25]), torch.tensor([4, 2])
    one = block_diffusion_sft_loss(logits[:1], targets[:1], masked[:1], p_mask[:1], lengths[:1])
    assert one.item() == pytest.approx(1.5, abs=1e-5)
    assert one.item() == pytest.approx(masked_diffusion_sft_loss(logits[:1], targets[:1], masked[:1], p_mask[:1],
                                                                 lengths[:1]).item(), abs=1e-6)
    both = block_diffusion_sft_loss(logits, targets, masked, p_mask, lengths)
    assert both.item() == pytest.approx((3.0 / 0.5 + 4.0 / 0.25) / 6, abs=1e-5)
    per_row_mean = masked_diffusion_sft_loss(logits, targets, masked, p_mask, lengths)
    assert per_row_mean.item() == pytest.approx((1.5 + 4.0 / 0.25 / 2) / 2, abs=1e-5)


def test_block_noise_masks_at_least_one_valid_token_per_row():
    valid = torch.zeros(512, 6, dtype=torch.bool)
    valid[:, :3] = True  # three answer tokens a row, the rest padding that is never masked
    valid[7] = False  # a row with no answer token cannot mask one and is left alone
    generator = torch.Generator().manual_seed(0)
    p_mask, masked = sample_answer_masks(512, 6, generator, valid=valid, at_least_one=True)
    assert not (masked & ~valid).any()
    has_one = masked.any(dim=1)
    assert has_one.sum() == 511 and not has_one[7]
    assert ((p_mask > 0) & (p_mask <= 1)).all()
    # LLaDA's noise (no redraw) leaves some rows of three tokens with nothing masked: the redraw is live.
    _, plain = sample_answer_masks(512, 6, torch.Generator().manual_seed(0), valid=valid)
    assert (~plain.any(dim=1)).sum() > 1
    # Rows that had a masked token keep their first draw.
    first = plain.any(dim=1)
    assert torch.equal(masked[first], plain[first])


def test_sft_uses_the_doubled_forward_for_a_block_causal_policy(monkeypatch):
    """The demonstration loss of a block-causal policy is the block-diffusion one (the doubled forward);
    a full-attention policy keeps LLaDA's single forward."""
    calls = []
    family = tiny_block_policy().family
    original = type(family).noisy_clean_forward

    def spy(self, *args, **kwargs):
        calls.append(kwargs["block_size"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(family), "noisy_clean_forward", spy)
    prompts, answers = ["sort 321\n", "sort 97\n"], ["123", "79"]
    for block_size, expected in ((4, [4]), (None, [])):
        calls.clear()
        policy = tiny_block_policy(block_size=block_size) if block_size else tiny_block_policy(block_size=None)
        batch = demonstration_batch(policy, prompts, answers, 8)
        loss = masked_diffusion_loss(policy, batch, torch.Generator().manual_seed(0))
        assert calls == expected and torch.isfinite(loss)


def test_block_diffusion_sft_trains_a_block_causal_model():
    """A few dozen block-diffusion SFT steps on digit sorting bring the loss down and make the block sampler
    write digits."""
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    config = TinyDLLMConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=256, mask_token_id=tokenizer.mask_token_id, block_size=4)
    policy = DiffusionPolicy(TinyDLLMForMaskedLM(config), tokenizer, family="tiny",
                             generation_defaults=dict(gen_length=8))
    losses = []
    train_on_demonstrations(policy, dare_gym.make("digitsort-v0"), answer_length=8, learning_rate=3e-3,
                            batch_size=32, max_steps=80, generator=torch.Generator().manual_seed(0), progress=False,
                            callback=lambda step, elapsed, loss: losses.append(loss))
    assert sum(losses[:5]) / 5 > 2.5 and sum(losses[-10:]) / 10 < 1.5
    test = dare_gym.make("digitsort-v0", split="test")
    texts = [c.text for c in policy.generate([test.reset(options={"index": i})[0] for i in range(20)])]
    assert sum(t.isdigit() and len(t) == 6 for t in texts) >= 14
