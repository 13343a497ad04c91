"""The rollout buffer: columnar, right-padded tensors plus the texts, shared by every algorithm.

One row per completion. GRPO reads it by group (``group_id``; rows of a group are consecutive), DPO by
chosen/rejected pairs, SFT by demonstrations. Algorithms add their own per-row columns (old and reference
log-probabilities, estimator noise) in ``columns``; every tensor's first dimension is the row, so
``select`` slices them all alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import torch

# Columns the trainer writes for every rollout (beside the fixed fields below).
CORRECT = "correct"  # [N] bool: the env's verdict (info["correct"])
ENDED = "ended"  # [N] bool: the completion holds a stop token (it did not run to the length limit)
COMMIT_LOGP = "commit_logp"  # [N, L] log-prob of each token in the sampler's forward that committed it


@dataclass
class SequenceBatch:
    """Model inputs for rows of the buffer: left-padded prompt then the completion, side by side."""

    input_ids: torch.Tensor  # [B, P + L]
    attention_mask: torch.Tensor  # [B, P + L]
    prompt_length: int  # P: the completion starts at this column
    completion_mask: torch.Tensor  # [B, L] tokens a loss counts (up to and including the first EOS)
    unmask_step: torch.Tensor | None = None  # [B, L] denoising step that committed each token (-1: none)

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length :]

    @property
    def prompt_ids(self) -> torch.Tensor:
        return self.input_ids[:, : self.prompt_length]

    @property
    def prompt_attention(self) -> torch.Tensor:
        return self.attention_mask[:, : self.prompt_length]

    def active_rows(self) -> torch.Tensor:
        """[B] bool: rows with a token to score (padding rows and discarded rows have none)."""
        return self.completion_mask.bool().any(dim=1)


def _pad(rows: Sequence[torch.Tensor], pad_value, dtype, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    padded = torch.full((len(rows), width), pad_value, dtype=dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        columns = slice(width - len(row), width) if left else slice(0, len(row))
        padded[i, columns] = row
        mask[i, columns] = 1
    return padded, mask


def left_pad(rows: Sequence[torch.Tensor], pad_value, dtype=torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths as one left-padded tensor and its 0/1 mask: the layout samplers use, so that
    prompts end in the same column and completions start in the next."""
    return _pad(rows, pad_value, dtype, left=True)


def right_pad(rows: Sequence[torch.Tensor], pad_value, dtype=torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths as one right-padded tensor and its 0/1 mask (completions and their columns)."""
    return _pad(rows, pad_value, dtype, left=False)


@dataclass
class RolloutBuffer:
    """Rollouts as rows: each prompt left-padded to the buffer's prompt width (the samplers' layout, so a
    minibatch's model input is the two blocks side by side), its completion, rewards and any extra columns."""

    prompt_ids: torch.Tensor  # [N, P] left-padded, as the samplers lay prompts out
    prompt_mask: torch.Tensor  # [N, P] 0 on the left padding
    completion_ids: torch.Tensor  # [N, L] right-padded
    completion_mask: torch.Tensor  # [N, L] scored tokens: up to and including the first EOS
    unmask_step: torch.Tensor  # [N, L] denoising step that committed each token (-1 on padding)
    reward: torch.Tensor  # [N]
    group_id: torch.Tensor  # [N]
    advantage: torch.Tensor | None = None  # [N]
    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    columns: dict[str, torch.Tensor] = field(default_factory=dict)
    pad_token_id: int = 0

    def __post_init__(self):
        mask = self.prompt_mask
        if mask.shape != self.prompt_ids.shape:
            raise ValueError(f"prompt_mask {tuple(mask.shape)} must match prompt_ids {tuple(self.prompt_ids.shape)}")
        if mask.shape[1] > 1 and bool((mask[:, 1:] < mask[:, :-1]).any()):
            row = int((mask[:, 1:] < mask[:, :-1]).any(dim=1).nonzero()[0])
            raise ValueError(f"prompt row {row} is not left-padded (mask {mask[row].tolist()}): the buffer keeps "
                             "prompts as the samplers lay them out; build them with dare_gym.core.buffer.left_pad")

    @classmethod
    def from_rollouts(
        cls,
        prompts: Sequence[str],
        completions: Sequence,  # dare_gym.core.policy.Completion
        rewards: Sequence[float],
        group_ids: Sequence[int],
        *,
        completion_mask_fn,
        pad_token_id: int,
        ended_fn=None,
    ) -> "RolloutBuffer":
        if not (len(prompts) == len(completions) == len(rewards) == len(group_ids)):
            raise ValueError(
                f"rollout columns differ in length: {len(prompts)} prompts, {len(completions)} completions, "
                f"{len(rewards)} rewards, {len(group_ids)} group ids"
            )
        prompt_ids, prompt_mask = left_pad([c.prompt_ids for c in completions], pad_token_id)
        completion_ids, present = right_pad([c.completion_ids for c in completions], pad_token_id)
        unmask_step, _ = right_pad([c.unmask_step for c in completions], -1)
        unmask_step[present == 0] = -1
        columns = {}
        if all(getattr(c, "commit_logp", None) is not None for c in completions):
            # what the rollout's own forward gave each token when it committed it (rollout/train mismatch)
            columns[COMMIT_LOGP] = right_pad([c.commit_logp for c in completions], 0.0, torch.float32)[0]
        if ended_fn is not None:
            columns[ENDED] = ended_fn(completion_ids).bool()
        return cls(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask_fn(completion_ids) * present,
            unmask_step=unmask_step,
            reward=torch.tensor(list(rewards), dtype=torch.float32),
            group_id=torch.tensor(list(group_ids), dtype=torch.long),
            prompts=list(prompts),
            completions=[c.text for c in completions],
            columns=columns,
            pad_token_id=pad_token_id,
        )

    @classmethod
    def from_pairs(cls, policy, pairs, *, max_prompt_tokens: int = 256, max_response_tokens: int = 64) -> "RolloutBuffer":
        """Offline preference pairs (``PreferencePair`` or anything with prompt/chosen/rejected) as buffer rows:
        chosen then rejected, one group per pair (reward 1 and 0), so that DPO/VRPO train on them as on
        ranked rollouts. Prompts keep their last ``max_prompt_tokens`` tokens; responses their first
        ``max_response_tokens``, then EOS padding to a common width."""
        tokenizer, eos = policy.tokenizer, policy.tokenizer.eos_token_id

        def ids(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        prompts, responses, rewards, groups = [], [], [], []
        for number, pair in enumerate(pairs):
            for response, reward in ((pair.chosen, 1.0), (pair.rejected, 0.0)):
                prompts.append(torch.tensor(ids(pair.prompt)[-max_prompt_tokens:], dtype=torch.long))
                responses.append(ids(response)[:max_response_tokens])
                rewards.append(reward)
                groups.append(number)
        width = max(len(r) for r in responses) + 1  # room for at least one EOS
        completion_ids = torch.tensor([r + [eos] * (width - len(r)) for r in responses], dtype=torch.long)
        prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)
        texts = [text for p in pairs for text in (p.chosen, p.rejected)]
        return cls(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
            completion_mask=policy.completion_mask(completion_ids), unmask_step=torch.zeros_like(completion_ids),
            reward=torch.tensor(rewards), group_id=torch.tensor(groups),
            prompts=[p.prompt for p in pairs for _ in range(2)], completions=texts,
            pad_token_id=tokenizer.pad_token_id,
        )

    def __len__(self) -> int:
        return self.reward.shape[0]

    def select(self, index: torch.Tensor | Sequence[int]) -> "RolloutBuffer":
        """The rows at ``index`` (a bool mask or integer indices), every column sliced alike."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        rows = index.tolist()
        return replace(
            self,
            prompt_ids=self.prompt_ids[index],
            prompt_mask=self.prompt_mask[index],
            completion_ids=self.completion_ids[index],
            completion_mask=self.completion_mask[index],
            unmask_step=self.unmask_step[index],
            reward=self.reward[index],
            group_id=self.group_id[index],
            advantage=None if self.advantage is None else self.advantage[index],
            prompts=[self.prompts[i] for i in rows],
            completions=[self.completions[i] for i in rows],
            columns={name: value[index] for name, value in self.columns.items()},
        )

    def active_rows(self) -> torch.Tensor:
        """[N] bool: rows with a token to score (rows discarded in a distributed run have none)."""
        return self.completion_mask.bool().any(dim=1)

    def discard(self, drop: torch.Tensor) -> "RolloutBuffer":
        """Without the rows ``drop`` [N] marks (no signal). One process: they are dropped (less work); several:
        they stay with nothing to score (completion mask zeroed), so that every rank runs the same calls on the
        same number of rows."""
        from dare_gym.core.distributed import is_distributed

        if not is_distributed():
            return self.select(~drop)
        self.completion_mask = self.completion_mask.masked_fill(drop[:, None].to(self.completion_mask.device), 0)
        return self

    def groups(self) -> list[torch.Tensor]:
        """Row indices of each group, in order of first appearance."""
        unique = torch.unique_consecutive(self.group_id)
        return [(self.group_id == g).nonzero().flatten() for g in unique]

    def row_chunks(self, size: int) -> list[torch.Tensor]:
        """The row indices in consecutive, unshuffled chunks of at most ``size`` (scoring a batch piecewise)."""
        return [torch.arange(start, min(start + size, len(self))) for start in range(0, len(self), size)]

    def minibatches(self, size: int, *, generator: torch.Generator | None = None,
                    unit: str | None = None) -> Iterator["RolloutBuffer"]:
        """Shuffled row subsets of about ``size`` rows covering the buffer once. With ``unit`` (a column name,
        or ``"group_id"``), rows sharing a value stay in one minibatch (DPO's chosen/rejected pairs)."""
        if unit is None:
            order = random_order(len(self), generator)
            for start in range(0, len(self), size):
                yield self.select(order[start : start + size])
            return
        keys = self.group_id if unit == "group_id" else self.columns[unit]
        units = torch.unique(keys)
        units = units[random_order(len(units), generator)]
        per_unit = max(1, len(self) // max(1, len(units)))
        step = max(1, size // per_unit)
        for start in range(0, len(units), step):
            yield self.select(torch.isin(keys, units[start : start + step]))

    def model_inputs(self, device: torch.device | str | None = None, *, response_only: bool = False) -> SequenceBatch:
        """The model input of these rows: the left-padded prompts and the completions side by side, the attention
        mask, and the completion columns' loss mask. The prompt width is the buffer's, not this selection's
        longest prompt: estimator noise drawn on the whole buffer (a prompt mask, say) then lines up with any
        minibatch of its rows. ``response_only``: the positions outside ``completion_mask`` (after the response)
        are hidden from attention as padding, as where the official code cuts each response at its end (DARE's
        preference data) instead of only masking its loss."""
        completion_present = (self.unmask_step >= 0).long()
        if response_only:
            completion_present = completion_present * self.completion_mask.long()
        batch = SequenceBatch(
            input_ids=torch.cat([self.prompt_ids, self.completion_ids], dim=1),
            attention_mask=torch.cat([self.prompt_mask.long(), completion_present], dim=1),
            prompt_length=self.prompt_ids.shape[1],
            completion_mask=self.completion_mask,
            unmask_step=self.unmask_step,
        )
        if device is not None:
            batch = replace(
                batch,
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                completion_mask=batch.completion_mask.to(device),
                unmask_step=batch.unmask_step.to(device),
            )
        return batch


def random_order(count: int, generator: torch.Generator | None) -> torch.Tensor:
    """A random order of ``count`` rows, drawn wherever ``generator`` lives and returned on the CPU (the buffer's
    home)."""
    device = generator.device if generator is not None else "cpu"
    return torch.randperm(count, generator=generator, device=device).cpu()
