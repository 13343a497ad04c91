"""Keeping evaluation records out of training.

:func:`guard_held_out` is what the trainer runs before its first step. It compares the records evaluation
will score (the first ``eval_size`` of the eval split) with the training split, by fingerprint (a hash of
each problem's text, :meth:`TextTaskEnv.fingerprint`):

- a procedural training stream (digitsort, countdown, sudoku4, rg/*) is told to skip those records when it
  draws, so nothing is refused and nothing evaluated is ever trained on;
- a training split read from a file is compared record by record: any record in common, or training on the
  evaluation split itself, raises :class:`SplitOverlapError`, unless ``allow_overlap`` is set, in which case a
  :class:`SplitOverlapWarning` says loudly what is being done.
"""

from __future__ import annotations

import warnings
from typing import Sequence

from dare_gym.envs.base import TextTaskEnv


class SplitOverlapError(ValueError):
    """The training split holds records that evaluation scores (held-out accuracy would not be held out)."""


class SplitOverlapWarning(UserWarning):
    """Training on records that evaluation scores, because the user allowed it."""


def env_label(env: TextTaskEnv) -> str:
    """``gsm8k-v0 split 'test' (path)``: which env, split and file a message is about."""
    name = env.spec.id.removeprefix("dare_gym/") if env.spec is not None else type(env).__name__
    source = getattr(env, "source", None)
    return f"{name} split {env.split!r}" + (f" ({source})" if source else "")


def same_split(a: TextTaskEnv, b: TextTaskEnv) -> bool:
    """Whether two envs serve the same split of the same task from the same source."""
    return (type(a) is type(b) and a.split == b.split and getattr(a, "source", None) == getattr(b, "source", None)
            and getattr(a, "task", None) == getattr(b, "task", None))


def _overlap_message(train: TextTaskEnv, held_out: TextTaskEnv, common: dict[str, int], total: int) -> str:
    other_splits = [s.name for s in train.splits if s.name != held_out.split]
    if same_split(train, held_out):
        what = f"the training split is the evaluation split, {env_label(held_out)}"
    else:
        first = min(common.values())
        example = " ".join(held_out.problem_text(held_out.load_record(first)).split())[:80]
        what = (f"{len(common)} of the {total} evaluation records of {env_label(held_out)} are also in the "
                f"training split {env_label(train)} (e.g. evaluation record {first}: {example!r})")
    fix = (f"train on split {other_splits[0]!r} (env_kwargs: {{split: {other_splits[0]}}})" if other_splits
           else f"{env_label(train).split(' ')[0]} has no other split, so train on another env")
    return (f"{what}; held-out accuracy would be measured on problems trained on. Either {fix}, or set "
            f"allow_eval_overlap: true to train on them anyway.")


def guard_held_out(train_envs: Sequence[TextTaskEnv], held_out: TextTaskEnv, *, eval_size: int | None = None,
                   allow_overlap: bool = False) -> str:
    """Make sure training never draws a record that evaluation scores; returns a one-line account.

    ``train_envs`` are the training sub-envs (all built alike), ``held_out`` the evaluation env, of which
    the first ``eval_size`` records are scored (all of a finite split when None). Raises
    :class:`SplitOverlapError` for a file-backed training split that shares records with them, unless
    ``allow_overlap``, which warns instead.
    """
    train = train_envs[0]
    if eval_size == 0:
        return "no evaluation: nothing to hold out"
    evaluated = held_out.fingerprints(limit=eval_size)
    if train.procedural and not same_split(train, held_out):
        for env in train_envs:
            env.hold_out(evaluated)
        return f"the {len(evaluated)} evaluation records of {env_label(held_out)} are never drawn for training"
    if same_split(train, held_out):
        common = evaluated
    else:
        trained = train.fingerprints()
        common = {fingerprint: index for fingerprint, index in evaluated.items() if fingerprint in trained}
    if not common:
        return f"{env_label(train)} and {env_label(held_out)} share no record"
    message = _overlap_message(train, held_out, common, len(evaluated))
    if not allow_overlap:
        raise SplitOverlapError(message)
    warning = f"allow_eval_overlap is set, so training goes ahead although {message.split('; ')[0]}"
    warnings.warn(warning, SplitOverlapWarning, stacklevel=2)
    return warning
