"""Score a policy on an env split: accuracy and mean reward of (by default greedy) completions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tqdm.auto import tqdm


@dataclass
class EvalResult:
    accuracy: float
    mean_reward: float
    num_records: int
    completions: list[str]
    correct: list[bool]


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
    if indices is None:
        count = env.num_records
        if count is None and limit is None:
            raise ValueError(f"split {env.split!r} of {env.spec.id if env.spec else env} is unbounded: pass limit=")
        indices = range(min(count, limit) if count is not None and limit is not None else (limit or count))
    indices = list(indices)
    prompts = [env.reset(options={"index": i})[0] for i in indices]
    completions: list[str] = []
    bar = tqdm(total=len(prompts), desc="eval", unit="prompt", disable=None if progress else True, leave=False)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        completions += [c.text for c in policy.generate(chunk, batch_size=batch_size, **generation)]
        bar.update(len(chunk))
    bar.close()
    rewards, correct = [], []
    for index, completion in zip(indices, completions):
        env.reset(options={"index": index})
        _, reward, _, _, info = env.step(completion)
        rewards.append(reward)
        correct.append(bool(info["correct"]))
    n = max(1, len(indices))
    return EvalResult(
        accuracy=sum(correct) / n,
        mean_reward=sum(rewards) / n,
        num_records=len(indices),
        completions=completions,
        correct=correct,
    )
