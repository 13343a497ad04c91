"""The rollout buffer keeps prompts left-padded, as the samplers lay them out: a minibatch's model input is the
prompt block and the completion block side by side, with nothing re-padded."""

from __future__ import annotations

import pytest
import torch

from dare_gym.core.buffer import RolloutBuffer, left_pad
from dare_gym.core.policy import Completion

PAD = 0


def completion(prompt: list[int], answer: list[int]) -> Completion:
    ids = torch.tensor(answer)
    return Completion(text="", prompt_ids=torch.tensor(prompt), completion_ids=ids, unmask_step=torch.arange(len(ids)))


def buffer_of(prompts: list[list[int]]) -> RolloutBuffer:
    rows = [completion(p, [7, 8, 2]) for p in prompts]
    return RolloutBuffer.from_rollouts([str(p) for p in prompts], rows, [1.0] * len(rows), list(range(len(rows))),
                                       completion_mask_fn=torch.ones_like, pad_token_id=PAD)


def test_left_pad_aligns_row_ends():
    padded, mask = left_pad([torch.tensor([5, 6, 7]), torch.tensor([9]), torch.tensor([], dtype=torch.long)], PAD)
    assert padded.tolist() == [[5, 6, 7], [PAD, PAD, 9], [PAD, PAD, PAD]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_model_inputs_put_every_completion_right_after_its_prompt_at_the_buffers_width():
    buffer = buffer_of([[5, 6, 7, 8], [9], [10, 11]])
    inputs = buffer.select([1, 2]).model_inputs()  # a minibatch keeps the buffer's prompt width
    assert inputs.prompt_length == 4
    assert inputs.input_ids.tolist() == [[PAD, PAD, PAD, 9, 7, 8, 2], [PAD, PAD, 10, 11, 7, 8, 2]]
    assert inputs.attention_mask.tolist() == [[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]]
    assert torch.equal(inputs.completion_ids, torch.tensor([[7, 8, 2], [7, 8, 2]]))


def test_a_right_padded_prompt_is_refused_with_the_row():
    with pytest.raises(ValueError, match=r"prompt row 1 is not left-padded \(mask \[1, 0\]\).*left_pad"):
        RolloutBuffer(prompt_ids=torch.tensor([[5, 6], [9, PAD]]), prompt_mask=torch.tensor([[1, 1], [1, 0]]),
                      completion_ids=torch.tensor([[2], [2]]), completion_mask=torch.ones(2, 1),
                      unmask_step=torch.zeros(2, 1, dtype=torch.long), reward=torch.zeros(2),
                      group_id=torch.zeros(2, dtype=torch.long))
