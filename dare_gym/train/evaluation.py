"""Score a policy on an env split: accuracy and mean reward of (by default greedy) completions.

:func:`evaluate` completes each record once; :func:`sample_and_score` completes each record ``n`` times (the
samples of a record are rows of the same sampler call) and is what pass@k (:mod:`dare_gym.tools.suite`) counts.
Completions are scored in one reward batch per call (:func:`score_completions`), so rewards that run programs
(HumanEval, MBPP) check them in parallel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm


@dataclass
class EvalResult:
    accuracy: float
    mean_reward: float
    num_records: int
    completions: list[str]
    correct: list[bool]
    rewards: list[float] = field(default_factory=list)  # each record's reward, in the order of ``completions``


@dataclass
class SampledResult:
    """``n`` scored completions of each record: ``correct[i][j]`` is sample ``j`` of record ``indices[i]``."""

    indices: list[int]
    completions: list[list[str]]
    correct: list[list[bool]]
    rewards: list[list[float]]

    @property
    def num_correct(self) -> list[int]:
        """Correct samples per record (the ``c`` of pass@k)."""
        return [sum(row) for row in self.correct]


def record_indices(env, limit: int | None) -> list[int]:
    """The first ``limit`` records of ``env``'s split (all of a finite split when ``limit`` is None)."""
    count = env.num_records
    if count is None and limit is None:
        raise ValueError(f"split {env.split!r} of {env.spec.id if env.spec else env} is unbounded: pass limit=")
    return list(range(min(count, limit) if count is not None and limit is not None else (limit or count)))


def score_completions(env, indices: Sequence[int], completions: Sequence[str]) -> tuple[list[float], list[bool]]:
    """``(rewards, correct)`` of completion ``j`` for record ``indices[j]``, scored as ``env.step`` scores them but
    in one reward batch (:meth:`CombinedReward.score_many`)."""
    if not hasattr(env, "begin_step"):  # an env that is not a TextTaskEnv: one step at a time
        rewards, correct = [], []
        for index, completion in zip(indices, completions):
            env.reset(options={"index": index})
            _, reward, _, _, info = env.step(completion)
            rewards.append(float(reward))
            correct.append(bool(info["correct"]))
        return rewards, correct
    pending, prompts = [], []
    for index, completion in zip(indices, completions):
        prompts.append(env.reset(options={"index": int(index)})[0])
        pending.append(env.begin_step(completion))
    results = env.reward_fn.score_many([p.completion for p in pending], [p.record for p in pending], prompts)
    steps = [env.finish_step(p, result) for p, result in zip(pending, results)]
    return [float(s[1]) for s in steps], [bool(s[4]["correct"]) for s in steps]


def evaluate(
    policy,
    env,
    *,
    indices: Sequence[int] | None = None,
    limit: int | None = None,
    batch_size: int = 256,
    progress: bool = False,
    **generation,
) -> EvalResult:
    """Complete records ``indices`` of ``env`` (default: the first ``limit``, or all) and score them.

    Generation settings (``gen_length``, ``steps``, ``temperature``...) default to the policy's, which are
    greedy unless told otherwise.
    """
    indices = record_indices(env, limit) if indices is None else list(indices)
    prompts = [env.reset(options={"index": i})[0] for i in indices]
    completions: list[str] = []
    bar = tqdm(total=len(prompts), desc="eval", unit="prompt", disable=None if progress else True, leave=False)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        completions += [c.text for c in policy.generate(chunk, batch_size=batch_size, **generation)]
        bar.update(len(chunk))
    bar.close()
    rewards, correct = score_completions(env, indices, completions)
    n = max(1, len(indices))
    return EvalResult(
        accuracy=sum(correct) / n,
        mean_reward=sum(rewards) / n,
        num_records=len(indices),
        completions=completions,
        correct=correct,
        rewards=rewards,
    )


def sample_and_score(
    policy,
    env,
    num_samples: int,
    *,
    indices: Sequence[int] | None = None,
    limit: int | None = None,
    batch_size: int = 256,
    seed: int | None = 0,
    progress: bool = False,
    desc: str = "sample",
    **generation,
) -> SampledResult:
    """Complete every record ``num_samples`` times and score each completion.

    The samples of a record are consecutive rows of one sampler call (a prompt repeated ``num_samples`` times);
    ``seed`` seeds one generator for the whole run, so a run is reproducible. ``generation`` as for
    :func:`evaluate` (pass ``temperature`` > 0, or every sample is the same greedy completion).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    indices = record_indices(env, limit) if indices is None else list(indices)
    prompts = [env.reset(options={"index": i})[0] for i in indices]
    generator = None if seed is None else torch.Generator(device=policy.device).manual_seed(seed)
    per_call = max(1, batch_size // num_samples)  # records per sampler call
    completions: list[list[str]] = []
    correct: list[list[bool]] = []
    rewards: list[list[float]] = []
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=None if progress else True, leave=False)
    for start in range(0, len(prompts), per_call):
        chunk, chunk_indices = prompts[start:start + per_call], indices[start:start + per_call]
        rows = [p for p in chunk for _ in range(num_samples)]
        texts = [c.text for c in policy.generate(rows, generator=generator, batch_size=len(rows), **generation)]
        scores, hits = score_completions(env, [i for i in chunk_indices for _ in range(num_samples)], texts)
        for k in range(len(chunk)):
            part = slice(k * num_samples, (k + 1) * num_samples)
            completions.append(texts[part])
            correct.append(hits[part])
            rewards.append(scores[part])
        bar.update(len(chunk))
    bar.close()
    return SampledResult(indices=indices, completions=completions, correct=correct, rewards=rewards)
