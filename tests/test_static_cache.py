"""The in-place key/value cache of the fast samplers and the lm head on chosen columns: the same numbers as the
plain forwards and the concatenating cache they replace."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import dare_gym
from dare_gym.models.caching import StaticKVCache
from dare_gym.models.standin import build_standin
from dare_gym.models.tiny import TinyDLLMConfig, TinyDLLMForMaskedLM
from dare_gym.models.tokenizer import build_char_tokenizer
from dare_gym.core.policy import DiffusionPolicy
from dare_gym.samplers.llada import denoise_blocks

PROMPTS = ["sort 583920\n", "hi", "a much longer prompt, with spaces!\n", "q: 2+2=?\n"]


def random_policy(seed: int = 0) -> DiffusionPolicy:
    """A random tiny dLLM in float64 (no near-tie can flip between two summation orders)."""
    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    config = TinyDLLMConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, initializer_range=0.5, mask_token_id=tokenizer.mask_token_id)
    return DiffusionPolicy(TinyDLLMForMaskedLM(config).double().eval(), tokenizer, family="tiny")


@pytest.mark.parametrize("family", ["llada", "dream", "sdar"])
@torch.no_grad()
def test_logits_for_chosen_columns_are_the_full_forwards_columns(family, tmp_path):
    policy = dare_gym.load_policy(build_standin(family, tmp_path / family), dtype="float32")
    ids, mask = policy.encode_prompts(["ab", "a longer row"])
    full = policy.logits(ids, mask)
    # every column, a few out of order, and (Dream) the first real token of a padded row, whose logit is its own
    width = ids.shape[1]
    for columns in (torch.arange(width), torch.tensor([width - 1, 3, width - 2]),
                    torch.tensor([int((mask[0] == 0).sum())])):
        picked = policy.logits(ids, mask, logits_to_keep=columns)
        assert picked.shape == (2, columns.numel(), full.shape[-1])
        torch.testing.assert_close(picked, full[:, columns], rtol=1e-5, atol=1e-5)


def test_the_static_cache_writes_in_place_and_reads_views():
    cache = StaticKVCache(6)
    keys = torch.arange(2 * 3 * 4 * 2, dtype=torch.float64).view(2, 3, 4, 2)
    read_keys, read_values = cache.window(0, 4).update(keys, -keys, layer_idx=0)
    assert torch.equal(read_keys, keys) and torch.equal(read_values, -keys) and cache.get_seq_length() == 0
    fresh = torch.full((2, 3, 2, 2), 7.0, dtype=torch.float64)
    read_keys, _ = cache.window(4, 6).update(fresh, fresh, layer_idx=0)
    assert read_keys.data_ptr() == cache.keys[0].data_ptr()  # a view of the buffer, not a copy
    assert torch.equal(read_keys[:, :, :4], keys) and torch.equal(read_keys[:, :, 4:], fresh)
    cache.move(4, 6, 1)  # overlapping ranges
    assert torch.equal(cache.keys[0][:, :, 1:3], fresh) and torch.equal(cache.keys[0][:, :, 0], keys[:, :, 0])
    with pytest.raises(ValueError, match="holds 2 positions; the forward fed 4"):
        cache.window(4, 6).update(keys, keys, layer_idx=0)
    with pytest.raises(ValueError, match="start < end <= capacity=6"):
        cache.window(5, 7)


class ConcatenatingPrefixCache:
    """Fast-dLLM's prefix cache as this project first wrote it: a DynamicCache that each step extends with the
    fed keys and that is then cut back to the prefix (copies of the whole cache), logits for a span."""

    def begin_block(self, start, end):
        self.start, self.cache = start, None

    def __call__(self, policy, x, attention_mask, wanted, end):
        total = x.shape[1]
        if self.cache is None:
            self.cache = DynamicCache()
            logits = policy.logits(x, attention_mask, cache=self.cache)
            scored = wanted
            logits = logits[:, wanted]
            fed = x.numel()
        else:
            scored = wanted[wanted >= self.start]
            logits = policy.logits(x[:, self.start:], attention_mask, cache=self.cache)[:, scored - self.start]
            fed = x[:, self.start:].numel()
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[..., :self.start, :], layer.values[..., :self.start, :]
        return scored, logits, fed


class ConcatenatingDualCache:
    """The dual cache as first written: prefix and suffix kept by index after the block's full forward; each step
    appends the block's keys after them and cuts them off again."""

    def begin_block(self, start, end):
        self.start, self.end, self.cache = start, end, None

    def __call__(self, policy, x, attention_mask, wanted, end):
        total = x.shape[1]
        if self.cache is None:
            self.cache = DynamicCache()
            logits = policy.logits(x, attention_mask, cache=self.cache)[:, wanted]
            kept = torch.cat([torch.arange(self.start), torch.arange(self.end, total)])
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., kept, :], layer.values[..., kept, :]
            self.kept, self.cached = kept, kept.numel()
            return wanted, logits, x.numel()
        scored = wanted[(wanted >= self.start) & (wanted < self.end)]
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, self.start:self.end]
        mask = torch.cat([attention_mask[:, self.kept], attention_mask[:, self.start:self.end]], dim=1)
        logits = policy.logits(x[:, self.start:self.end], mask, cache=self.cache, position_ids=positions)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[..., :self.cached, :], layer.values[..., :self.cached, :]
        return scored, logits[:, scored - self.start], x[:, self.start:self.end].numel()


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_the_in_place_caches_decode_what_the_concatenating_caches_decoded(cache, temperature):
    from dare_gym.samplers.fast_dllm import DualCache, PrefixCache, ThresholdCommit

    policy = random_policy(3)
    ids, mask = policy.encode_prompts(PROMPTS)  # left-padded rows of different lengths
    reference_forward = {"prefix": ConcatenatingPrefixCache, "dual": ConcatenatingDualCache}[cache]
    forward = {"prefix": PrefixCache, "dual": DualCache}[cache]
    for commit in (None, ThresholdCommit(0.3)):
        runs = [denoise_blocks(policy, ids, mask, gen_length=12, steps=12, block_length=4, temperature=temperature,
                               remasking="low_confidence", generator=torch.Generator().manual_seed(5),
                               record_predictions=False, forward=make(), commit=commit)
                for make in (reference_forward, forward)]
        reference, static = runs
        assert torch.equal(static.completion_ids, reference.completion_ids)
        assert torch.equal(static.unmask_step, reference.unmask_step)
        torch.testing.assert_close(static.commit_logp, reference.commit_logp, rtol=0, atol=1e-6)
        assert static.tokens_processed == reference.tokens_processed and static.model_calls == reference.model_calls


def test_recorded_predictions_are_unchanged_by_scoring_only_the_needed_columns():
    """With record_predictions the sampler scores every completion column; without, only the masked ones: the
    committed tokens are the same."""
    policy = random_policy(4)
    settings = dict(gen_length=12, steps=6, block_length=4, temperature=0.0)
    plain = policy.generate(PROMPTS, **settings)
    ids, mask = policy.encode_prompts(PROMPTS)
    recorded = denoise_blocks(policy, ids, mask, **settings, remasking="low_confidence", generator=None,
                              record_predictions=True)
    assert [c.completion_ids.tolist() for c in plain] == recorded.completion_ids.tolist()
    assert recorded.step_predictions.shape == (len(PROMPTS), 6, 12)


def test_a_stand_in_of_chosen_sizes_keeps_the_real_config_and_vocabulary(families_dir, tmp_path):
    """build_standin(sizes=): the compute-bound benchmark's checkpoint, shrunk to chosen sizes (here smaller)."""
    folder = build_standin("llada", tmp_path / "llada", source=families_dir / "LLaDA-8B-Instruct",
                           sizes={"d_model": 64, "n_heads": 2, "n_kv_heads": 2, "n_layers": 1, "mlp_hidden_size": 192})
    policy = dare_gym.load_policy(folder)
    config = policy.model.config
    assert (config.d_model, config.n_layers, config.mlp_hidden_size, config.padded_vocab_size) == (64, 1, 192, 126464)
    assert policy.mask_token_id == 126336
    with pytest.raises(ValueError, match=r"sizes \['d_modle'\] are not keys of the llada config"):
        build_standin("llada", tmp_path / "bad", source=families_dir / "LLaDA-8B-Instruct", sizes={"d_modle": 64})
    with pytest.raises(ValueError, match="pass source="):
        build_standin("llada", tmp_path / "bad", sizes={"d_model": 64})
