"""What a training run prints: a progress bar on a terminal, plain lines elsewhere, and reward failures.

On a terminal the bar counts steps (a run ends at ``max_steps``; ``time_limit_minutes`` is a guard, shown
beside the bar, that says so when it stops a run early). When the output goes to a file, a pipe or CI, a bar would print nothing useful, so
a plain line is printed every ``every`` steps instead:

    step 10 | reward 0.412 | held-out acc 0.512 (step 10) | 2.90 s/step | 4m31s left
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Any, Mapping, Sequence, TextIO

from tqdm.auto import tqdm

FAILURE_FRACTION = 0.5  # a reward failing on more than this share of a step's rollouts is reported


def format_duration(seconds: float) -> str:
    """``45s``, ``4m31s``, ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def remaining_seconds(step: int, max_steps: int, seconds_per_step: float | None, elapsed: float,
                      time_limit_s: float | None) -> float | None:
    """Time to the first of the step cap and the time limit; None before a rate is known and with no limit."""
    estimates = []
    if seconds_per_step is not None:
        estimates.append((max_steps - step) * seconds_per_step)
    if time_limit_s is not None:
        estimates.append(time_limit_s - elapsed)
    return max(0.0, min(estimates)) if estimates else None


def status_line(step: int, stats: Mapping[str, Any], evaluation: Mapping[str, Any], eval_step: int | None,
                seconds_per_step: float | None, remaining: float | None) -> str:
    """One plain progress line; fields that are not known yet are left out."""
    parts = [f"step {step}"]
    if "reward_mean" in stats:
        parts.append(f"reward {stats['reward_mean']:.3f}")
    if "heldout_accuracy" in evaluation:
        parts.append(f"held-out acc {evaluation['heldout_accuracy']:.3f} (step {eval_step})")
    if seconds_per_step is not None:
        parts.append(f"{seconds_per_step:.2f} s/step")
    if remaining is not None:
        parts.append(f"{format_duration(remaining)} left")
    return " | ".join(parts)


def _bar_wanted(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("TQDM_DISABLE")


class TrainingProgress:
    """Shows a run's progress: a bar when ``bar_stream`` is a terminal, else a line every ``every`` steps on
    ``stream``; nothing at all when ``enabled`` is false. :meth:`message` prints a line either way."""

    def __init__(self, *, max_steps: int, time_limit_s: float | None, start_step: int, start_elapsed: float,
                 every: int, enabled: bool = True, stream: TextIO | None = None, bar_stream: TextIO | None = None):
        self.max_steps, self.time_limit_s, self.every = max_steps, time_limit_s, every
        self.start_step, self.start_elapsed = start_step, start_elapsed
        self.stream = stream or sys.stdout
        bar_stream = bar_stream or sys.stderr
        self.bar = None
        self.lines = enabled and not _bar_wanted(bar_stream)
        if enabled and not self.lines:  # the step cap ends a run; the time limit, a guard, shows in the postfix
            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", file=bar_stream)

    def seconds_per_step(self, step: int, elapsed: float) -> float | None:
        done = step - self.start_step
        return (elapsed - self.start_elapsed) / done if done > 0 else None

    def update(self, step: int, elapsed: float, stats: Mapping[str, Any], evaluation: Mapping[str, Any],
               eval_step: int | None, *, last: bool = False) -> None:
        """After step ``step`` (``stats`` of its rollouts; ``evaluation`` the latest held-out scores)."""
        rate = self.seconds_per_step(step, elapsed)
        if self.bar is not None:
            postfix = {"reward": f"{stats.get('reward_mean', float('nan')):.3f}"}
            if "heldout_accuracy" in evaluation:
                postfix["acc"] = f"{evaluation['heldout_accuracy']:.3f}"
            if self.time_limit_s is not None:
                postfix["time"] = f"{format_duration(elapsed)} of {format_duration(self.time_limit_s)} guard"
            self.bar.n = step
            self.bar.set_postfix(postfix)  # refreshes the bar
        elif self.lines and (step % self.every == 0 or step == self.start_step + 1 or last):
            remaining = 0.0 if last else remaining_seconds(step, self.max_steps, rate, elapsed, self.time_limit_s)
            self.message(status_line(step, stats, evaluation, eval_step, rate, remaining))

    def message(self, text: str) -> None:
        """A line that must be seen (above the bar when there is one)."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def rollout_reward_errors(step_infos: Mapping[str, Any], count: int) -> list[dict[str, str]]:
    """Each rollout's ``{reward term: reason}`` (empty where every term scored) from a vector env's infos.

    Accepts the two layouts of Gymnasium vector infos: ``reward_errors`` as an array of per-rollout dicts
    with a ``_reward_errors`` mask, or as a dict of per-term arrays each with its own ``_term`` mask.
    """
    errors = step_infos.get("reward_errors")
    present = step_infos.get("_reward_errors")
    per_rollout: list[dict[str, str]] = [{} for _ in range(count)]
    if errors is None:
        return per_rollout
    if isinstance(errors, Mapping):
        for name, reasons in errors.items():
            if name.startswith("_"):
                continue
            mask = errors.get(f"_{name}")
            for i in range(count):
                if (mask is None or mask[i]) and reasons[i]:
                    per_rollout[i][name] = str(reasons[i])
        return per_rollout
    for i in range(count):
        if (present is None or present[i]) and isinstance(errors[i], Mapping):
            per_rollout[i] = {str(k): str(v) for k, v in errors[i].items()}
    return per_rollout


class RewardFailureMonitor:
    """Says on the console when a reward term fails (raises, times out, returns a non-number) on most of a
    step's rollouts: such a run learns from zeros. Each term is reported at most once per ``every`` steps."""

    def __init__(self, every: int, fraction: float = FAILURE_FRACTION):
        self.every, self.fraction = every, fraction
        self.reported: dict[str, int] = {}

    def check(self, step: int, errors: Sequence[Mapping[str, str]]) -> list[str]:
        """Messages for the terms that failed on more than ``fraction`` of ``errors`` (one dict per rollout)."""
        reasons: dict[str, list[str]] = {}
        for rollout in errors:
            for name, reason in rollout.items():
                reasons.setdefault(name, []).append(reason)
        messages = []
        for name, failed in reasons.items():
            if len(failed) <= self.fraction * len(errors):
                continue
            if name in self.reported and step - self.reported[name] < self.every:
                continue
            self.reported[name] = step
            messages.append(
                f"warning: reward {name!r} failed on {len(failed)} of {len(errors)} rollouts at step {step} "
                f"(they score 0 for it), e.g. {failed[0]}"
            )
        return messages


# Library modules whose deprecation notices are meant for this package's developers, not its users.
QUIET_MODULES = r"(transformers|peft|accelerate|huggingface_hub|torch)(\.|$)"


@contextlib.contextmanager
def quiet_library_warnings():
    """Hide the FutureWarning / DeprecationWarning notices that transformers and peft print while a policy
    is loaded or wrapped (they name their own internals and call for no action from a user)."""
    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=QUIET_MODULES)
        yield
