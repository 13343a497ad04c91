"""A vector of text envs whose sub-envs come in groups that share one problem (GRPO groups).

Gymnasium's ``SyncVectorEnv`` auto-resets each sub-env independently; GRPO needs ``group_size`` completions
of the *same* prompt, so here one problem index is drawn per group and every member is reset to it.
Observations are a tuple of prompt strings; rewards, terminations and truncations are numpy arrays; ``infos``
follows Gymnasium's vector convention (a dict of arrays, with ``_key`` masks).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from gymnasium import spaces
from gymnasium.vector import VectorEnv

from dare_gym.envs.base import UNBOUNDED_INDEX, TextTaskEnv


def _stack_infos(infos: Sequence[dict]) -> dict:
    keys = sorted({key for info in infos for key in info})
    stacked: dict[str, Any] = {}
    for key in keys:
        values = np.empty(len(infos), dtype=object)
        present = np.zeros(len(infos), dtype=bool)
        for i, info in enumerate(infos):
            if key in info:
                values[i], present[i] = info[key], True
        present_values = values[present]
        if all(isinstance(v, (bool, np.bool_)) for v in present_values):
            values = values.astype(bool)
        elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in present_values):
            values = values.astype(np.int64)
        elif all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in present_values):
            values = values.astype(np.float64)
        stacked[key], stacked[f"_{key}"] = values, present
    return stacked


class GroupedTextVectorEnv(VectorEnv):
    """Sub-envs built alike (``make_vec`` passes them the same arguments), so one reward scores them all."""

    def __init__(self, envs: Sequence[TextTaskEnv], group_size: int = 1):
        if not envs:
            raise ValueError("a vector env needs at least one sub-env")
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        if len(envs) % group_size:
            raise ValueError(f"num_envs={len(envs)} must be a multiple of group_size={group_size}")
        self.envs = list(envs)
        self.num_envs = len(envs)
        self.group_size = group_size
        self.single_observation_space = envs[0].observation_space
        self.single_action_space = envs[0].action_space
        self.observation_space = spaces.Tuple([self.single_observation_space] * self.num_envs)
        self.action_space = spaces.Tuple([self.single_action_space] * self.num_envs)
        self.metadata = dict(envs[0].metadata, autoreset_mode=None)
        self.spec = envs[0].spec
        self.group_ids = np.arange(self.num_envs) // group_size

    @property
    def num_groups(self) -> int:
        return self.num_envs // self.group_size

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[tuple[str, ...], dict]:
        """Draw one problem per group (or take ``options={"indices": [...]}``, one index per group)."""
        super().reset(seed=seed)
        options = dict(options or {})
        indices = options.pop("indices", None)
        if options:
            raise ValueError(f"unknown reset option(s) {sorted(options)}; supported: ['indices']")
        if indices is None:
            count = self.envs[0].num_records
            indices = self.np_random.integers(count or UNBOUNDED_INDEX, size=self.num_groups).tolist()
        if len(indices) != self.num_groups:
            raise ValueError(f"need one index per group ({self.num_groups}), got {len(indices)}")
        prompts, infos = [], []
        for env, group in zip(self.envs, self.group_ids):
            prompt, info = env.reset(options={"index": int(indices[group])})
            prompts.append(prompt)
            infos.append(dict(info, group_id=int(group)))
        return tuple(prompts), _stack_infos(infos)

    def step(self, completions: Sequence[str]):
        if len(completions) != self.num_envs:
            raise ValueError(f"need one completion per sub-env ({self.num_envs}), got {len(completions)}")
        # Score all completions in one call, so that batched (TRL-style) rewards see the whole batch.
        begun = [env.begin_step(completion) for env, completion in zip(self.envs, completions)]
        records = [record for record, _ in begun]
        scored = self.envs[0].reward_fn.score_many(
            list(completions), records, [env.prompt(record) for env, record in zip(self.envs, records)]
        )
        results = [
            env.finish_step(completion, record, index, result)
            for env, completion, (record, index), result in zip(self.envs, completions, begun, scored)
        ]
        observations = tuple(r[0] for r in results)
        rewards = np.array([r[1] for r in results], dtype=np.float64)
        terminated = np.array([r[2] for r in results], dtype=bool)
        truncated = np.array([r[3] for r in results], dtype=bool)
        return observations, rewards, terminated, truncated, _stack_infos([r[4] for r in results])

    def close_extras(self, **kwargs) -> None:
        for env in self.envs:
            env.close()
