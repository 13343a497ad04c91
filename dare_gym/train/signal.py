"""Steps that cannot teach the policy anything, said at once with their cause and what to change.

A policy-gradient step learns only from rows whose advantage is not zero. With group-relative advantages a
group whose completions all scored alike has none (its rows are dropped: ``rows_trained`` 0, and
``zero_variance_fraction`` 1 when every group is so). Such a run would otherwise log a number every step and
exit 0 having learned nothing; :class:`NoSignalWatch` reports the first such step on the console with its
cause, and stops the run after ``stop_after_no_signal_steps`` of them in a row.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence


class NoLearningSignal(RuntimeError):
    """A run stopped because ``stop_after_no_signal_steps`` consecutive steps had no learning signal."""


class RewardFailedEverywhere(RuntimeError):
    """``strict_rewards``: a reward term failed (raised, timed out, returned a non-number) on every rollout."""


def no_signal_cause(stats: Mapping[str, Any], *, group_size: int, gen_length: int | None,
                    reward_errors: Sequence[Mapping[str, str]]) -> str:
    """Why a step trained no row (``stats`` are the step's logged metrics, ``reward_errors`` one dict per
    rollout) and what to change, most specific cause first."""
    if group_size == 1:
        return ("group_size=1: each group holds one completion, so every group-relative advantage is 0; "
                "set group_size to 2 or more (8 is usual)")
    if reward_errors and all(reward_errors):
        failed = sorted({name for errors in reward_errors for name in errors})
        example = next(iter(reward_errors[0].values()))
        return (f"reward {', '.join(map(repr, failed))} failed on every rollout (e.g. {example}), so every completion "
                "scored alike; fix the reward (strict_rewards=true stops a run at the first such step)")
    mean, spread = stats.get("reward_mean"), stats.get("reward_std")
    length, truncated = stats.get("completion_length"), stats.get("truncated_fraction")
    if mean is not None and spread == 0:
        shape = f"every completion scored {mean:g}"
        hints = []
        if truncated is not None and truncated >= 0.5:
            hints.append(f"{truncated:.0%} of completions ran to the length limit"
                         + (f" (rollout.gen_length={gen_length})" if gen_length else "")
                         + " without finishing: raise rollout.gen_length")
        elif length is not None and length < 2:
            hints.append(f"completions are {length:.1f} tokens long on average: the policy stops at once "
                         "(set rollout.min_new_tokens, or start from a policy that answers)")
        if mean == 0:
            hints.append("the task is too hard for this policy: give partial credit in the reward "
                         "(env_kwargs.reward), pick an easier env, or start from a stronger policy")
        else:
            hints.append("the reward does not tell completions apart: it should score better answers higher")
        return f"{shape}: " + "; ".join(hints)
    if stats.get("zero_variance_fraction") == 1:
        return ("within every group the completions scored alike: raise rollout.temperature so completions differ, "
                "raise group_size, or give partial credit in the reward")
    return ("the algorithm dropped every row of the batch (see its filtering options: `dare-gym algorithms "
            "NAME`)")


class NoSignalWatch:
    """Counts consecutive steps with no learning signal; says so on the first of a streak and every ``every``
    steps of it, and tells when ``limit`` of them in a row (None: never) should stop the run."""

    def __init__(self, limit: int | None, every: int):
        self.limit, self.every = limit, every
        self.streak = 0
        self.cause = ""

    def observe(self, step: int, trained_rows: float, cause: str | None) -> str | None:
        """After step ``step``: a console message, or None. ``cause`` is computed by the caller only when
        ``trained_rows`` is 0."""
        if trained_rows > 0:
            self.streak = 0
            return None
        self.streak += 1
        self.cause = cause or ""
        if self.streak == 1 or self.streak % self.every == 0:
            limit = (f"; the run stops after {self.limit} such steps in a row (stop_after_no_signal_steps)"
                     if self.limit else "")
            return (f"warning: no learning signal at step {step} (rows_trained 0, {self.streak} step(s) in a row): "
                    f"{self.cause}{limit}")
        return None

    @property
    def exhausted(self) -> bool:
        return bool(self.limit) and self.streak >= self.limit

    def stop_message(self) -> str:
        return (f"stopped after {self.streak} consecutive steps with no learning signal (rows_trained 0): "
                f"{self.cause}. Set stop_after_no_signal_steps=null to train on regardless.")


def strict_reward_problem(step: int, reward_errors: Sequence[Mapping[str, str]]) -> str | None:
    """The terms that failed on every rollout of step ``step`` (``strict_rewards``), or None."""
    if not reward_errors:
        return None
    everywhere = [name for name in reward_errors[0] if all(name in errors for errors in reward_errors)]
    if not everywhere:
        return None
    return (f"strict_rewards: reward {', '.join(map(repr, everywhere))} failed on all {len(reward_errors)} rollouts "
            f"at step {step}, e.g. {reward_errors[0][everywhere[0]]}")


__all__ = ["NoLearningSignal", "NoSignalWatch", "RewardFailedEverywhere", "no_signal_cause",
           "strict_reward_problem"]
