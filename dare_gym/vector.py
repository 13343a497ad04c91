"""A vector of text envs whose sub-envs come in groups that share one problem (GRPO groups).

Gymnasium's ``SyncVectorEnv`` resets each sub-env on its own; GRPO needs ``group_size`` completions of the
*same* prompt, so here one problem index is drawn per group and every member is reset to it, on ``reset``
and on every autoreset.

**Autoreset: ``AutoresetMode.SAME_STEP``.** Every episode of a text task is one step, so every ``step`` ends
every sub-env's episode. Under Gymnasium's default ``NEXT_STEP`` mode the following ``step`` would be a reset
whose actions are ignored: every other batch of completions (the expensive part, a dLLM generation) would be
thrown away. Under ``SAME_STEP``, as Gymnasium defines it, ``step`` scores the completions, resets the
sub-envs at once (new problems, one per group) and returns the new prompts as observations; the ended
episodes' last observation and info go to ``infos["final_obs"]`` and ``infos["final_info"]``, and the top
level of ``infos`` holds the reset infos of the new episodes (``index``, ``group_id``, ...). So the loop is
``obs = step(policy(obs))[0]`` with no wasted step, and ``correct`` / ``reward_components`` of the scored
completions are read from ``infos["final_info"]``.

Autoreset draws come from a random stream of their own (seeded with ``reset(seed=...)``), so an explicit
``reset()`` draws the same problems whether or not the env auto-reset in between.

Observations are a tuple of prompt strings; rewards, terminations and truncations are numpy arrays; ``infos``
follow Gymnasium's vector convention exactly as ``SyncVectorEnv`` builds them (a dict of arrays with ``_key``
masks, nested dicts such as ``reward_components`` as dicts of arrays).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv

from dare_gym.envs.base import TextTaskEnv

AUTORESET_STREAM = 0x5A4D  # mixed into the reset seed to give autoreset draws their own stream


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
        self.autoreset_mode = AutoresetMode.SAME_STEP
        self.metadata = dict(envs[0].metadata, autoreset_mode=self.autoreset_mode)
        self.render_mode = envs[0].render_mode
        self.spec = envs[0].spec
        self.group_ids = np.arange(self.num_envs) // group_size
        self._autoreset_rng: np.random.Generator | None = None

    @property
    def num_groups(self) -> int:
        return self.num_envs // self.group_size

    def demonstrations(self, indices: Sequence[int]) -> list[str]:
        """The gold completions of records ``indices`` (an error naming the env where it has none)."""
        return [self.envs[0].demonstration(self.envs[0].record(int(i))) for i in indices]

    def hints(self, indices: Sequence[int], fraction: float) -> list[str | None]:
        """The env's hint (the first ``fraction`` of the reference reasoning, :meth:`TextTaskEnv.hint`) for each
        of records ``indices``; None where the task has none."""
        return [self.envs[0].hint(self.envs[0].record(int(i)), fraction) for i in indices]

    def judge(self, index: int, completions: Sequence[str]) -> list[bool]:
        """The env's verdict (``is_correct``) on each of several completions of record ``index``."""
        record = self.envs[0].record(int(index))
        return [bool(self.envs[0].is_correct(text, record)) for text in completions]

    def score_texts(self, index: int, completions: Sequence[str]) -> list[float]:
        """The rewards of several completions of record ``index`` (one reward batch)."""
        return self.envs[0].score_texts(int(index), completions)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[tuple[str, ...], dict]:
        """Draw one problem per group (or take ``options={"indices": [...]}``, one index per group)."""
        super().reset(seed=seed)
        if seed is not None:
            self._autoreset_rng = np.random.default_rng([seed, AUTORESET_STREAM])
        options = dict(options or {})
        indices = options.pop("indices", None)
        if options:
            raise ValueError(f"unknown reset option(s) {sorted(options)}; supported: ['indices']")
        if indices is None:
            indices = self.envs[0].draw_indices(self.np_random, size=self.num_groups)
        if len(indices) != self.num_groups:
            raise ValueError(f"need one index per group ({self.num_groups}), got {len(indices)}")
        return self._reset_groups(indices, {})

    def _reset_groups(self, indices: Sequence[int], infos: dict) -> tuple[tuple[str, ...], dict]:
        """Reset every member of group g to record ``indices[g]``; add their reset infos to ``infos``."""
        prompts = []
        for i, (env, group) in enumerate(zip(self.envs, self.group_ids)):
            prompt, info = env.reset(options={"index": int(indices[group])})
            prompts.append(prompt)
            infos = self._add_info(infos, dict(info, group_id=int(group)), i)
        return tuple(prompts), infos

    def step(self, completions: Sequence[str]):
        """Score one completion per sub-env, then auto-reset every sub-env (``SAME_STEP``)."""
        if len(completions) != self.num_envs:
            raise ValueError(f"need one completion per sub-env ({self.num_envs}), got {len(completions)}")
        # Score all completions in one call, so that batched (TRL-style) rewards see the whole batch.
        pending = [env.begin_step(completion) for env, completion in zip(self.envs, completions)]
        scored = self.envs[0].reward_fn.score_many(
            [p.completion for p in pending], [p.record for p in pending],
            [env.prompt(p.record) for env, p in zip(self.envs, pending)],
        )
        results = [env.finish_step(p, result) for env, p, result in zip(self.envs, pending, scored)]
        rewards = np.array([r[1] for r in results], dtype=np.float64)
        terminated = np.array([r[2] for r in results], dtype=bool)
        truncated = np.array([r[3] for r in results], dtype=bool)
        infos: dict = {}
        for i, (final_obs, _, _, _, final_info) in enumerate(results):
            infos = self._add_info(infos, {"final_obs": final_obs, "final_info": final_info}, i)
        # A text episode is one step: every sub-env is done, so every group gets a fresh problem.
        indices = self.envs[0].draw_indices(self._autoreset_stream(), size=self.num_groups)
        observations, infos = self._reset_groups(indices, infos)
        return observations, rewards, terminated, truncated, infos

    def _autoreset_stream(self) -> np.random.Generator:
        if self._autoreset_rng is None:
            self._autoreset_rng = np.random.default_rng()
        return self._autoreset_rng

    def render(self) -> tuple[str | None, ...]:
        return tuple(env.render() for env in self.envs)

    def close_extras(self, **kwargs) -> None:
        for env in self.envs:
            env.close()
