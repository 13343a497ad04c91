"""The reward protocol, the reward registry and weighted combinations.

A reward is a plain function ``fn(completion: str, sample: Mapping) -> float``: ``sample`` is the task's
record, gold answer included. TRL-style batched functions ``fn(prompts, completions, **columns) ->
list[float | None]`` plug in too (detected by their first two parameter names, or marked with
:func:`batched`); ``None`` means "does not apply to this sample" and scores 0 without an error. A
per-sample reward may also carry ``fn.batch_fn(completions, samples) -> list[float]``, a faster way to score
many at once (the code rewards run their programs in parallel through it).

Rewards know nothing of models or tensors. A reward that raises (``SystemExit`` included), returns something
that is not a finite number (text is not a number, even ``"1.0"``; ``10**400`` is beyond a float), or runs past
its time limit scores 0 and the reason is reported: a bad reward never stops a run. Under a time limit the
returned value is turned into a float in the helper process too, since that runs the reward's code
(``__float__``).

Where a reward runs (:class:`CombinedReward`):

* without a time limit (``timeout_s=None``), in the calling thread, as a plain call;
* with a limit, in a helper process that is killed at the limit (:mod:`dare_gym.rewards.worker`): the
  project's own rewards in long-lived spawned helpers, any other callable (lambdas and closures included) in
  copies of this process forked for the batch. The calls of one batch run in parallel, each under the limit,
  so hung completions cost one limit, not one each; a limit holds even against work that holds the GIL, and
  a hung reward never keeps the process from exiting. What a reward changes in its process's memory stays in
  the helper, and a reward that uses torch or CUDA cannot run in a forked copy: give it no limit.
* A reward registered with ``linear_time=True`` (the project's format, exact-match, Countdown and Sudoku
  rewards) runs in the calling thread even under a limit when the completion is short enough to finish
  within it: its running time is linear in the completion's length and it never blocks, so a completion of at
  most ``timeout_s * LINEAR_CHARS_PER_S`` characters is done in time (that rate is over 30 times below the
  slowest measured on pathological text, see experiments/bench_reward_limits.py); a longer one goes to a
  helper like any other.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, Union

from dare_gym.registries import Registry
from dare_gym.rewards.worker import Call, Outcome, describe_error, run_calls

RewardFn = Callable[[str, Mapping], float]
RewardSpec = Union[str, RewardFn, Sequence[tuple[Union[str, RewardFn], float]], "CombinedReward"]
DEFAULT_RANGE = (0.0, 1.0)
LINEAR_CHARS_PER_S = 1_000_000
"""Characters per second a ``linear_time`` reward is trusted to score at least (see experiments/bench_reward_limits.py)."""

REWARDS: Registry = Registry("reward")


def batched(fn: Callable) -> Callable:
    """Mark ``fn(prompts, completions, **columns) -> list[float | None]`` as a batched (TRL-style) reward."""
    fn.batched = True
    return fn


def is_batched(fn: Callable) -> bool:
    if getattr(fn, "batched", False):
        return True
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return names[:2] == ["prompts", "completions"]


def register_reward(name: str, fn: RewardFn | None = None, *, overwrite: bool = False,
                    value_range: tuple[float, float] = DEFAULT_RANGE, linear_time: bool = False):
    """Register ``fn`` under ``name``; usable as ``register_reward("x", fn)`` or as a decorator.

    ``value_range`` declares the scores the reward can return (checked by the property tests).
    ``linear_time=True`` declares that ``fn`` scores at least ``LINEAR_CHARS_PER_S`` characters of completion a
    second whatever the text, and never blocks: under a time limit it may then run in the calling thread (see
    the module docstring). Declare it only for code you have made linear; anything else runs in a helper.
    """

    def add(f: RewardFn) -> RewardFn:
        if not callable(f):
            raise TypeError(f"reward {name!r} must be callable, got {type(f).__name__}")
        if name in REWARDS and not overwrite and REWARDS[name] is not f:
            raise ValueError(f"a reward named {name!r} is already registered; pass overwrite=True to replace it")
        f.reward_name = name
        f.value_range = tuple(value_range)
        f.linear_time = bool(linear_time)
        return REWARDS.add(name, f, overwrite=True)

    return add if fn is None else add(fn)


def get_reward(name: str) -> RewardFn:
    return REWARDS.lookup(name)


def list_rewards() -> list[str]:
    return REWARDS.names()


@dataclass
class RewardResult:
    """A scored completion: the weighted total, each term's raw score, and any term that failed."""

    total: float
    components: dict[str, float]
    errors: dict[str, str] = field(default_factory=dict)
    not_applicable: list[str] = field(default_factory=list)


def _term_name(fn: Callable) -> str:
    return getattr(fn, "reward_name", None) or getattr(fn, "__name__", None) or type(fn).__name__


def check_score(value, *, none_allowed: bool = False) -> tuple[float | None, str | None]:
    """``(score, None)`` for a usable score (None for "not applicable" where ``none_allowed``), else ``(0.0,
    why)``: a value that is not a finite number scores 0 with the reason. Text is not a number, even text that
    reads as one (``"1.0"``); a number beyond a float's range (``10**400``, a huge ``Fraction``) is not a score.
    Under a time limit this runs in the reward's helper process (see :func:`checked_score`): converting a
    returned object calls its code."""
    if value is None:
        return (None, None) if none_allowed else (0.0, "returned None (a per-sample reward must return a number)")
    if isinstance(value, (str, bytes, bytearray)):
        return 0.0, f"returned {type(value).__name__} {_preview(value)}, which is not a number"
    try:
        number = float(value)
    except OverflowError:
        return 0.0, f"returned a {type(value).__name__} too large for a float score"
    except (TypeError, ValueError):
        return 0.0, f"returned {type(value).__name__} {_preview(value)}, which is not a number"
    if not math.isfinite(number):
        return 0.0, f"returned a non-finite score {number!r}"
    return number, None


def _preview(value) -> str:
    """The start of ``repr(value)`` for a message; never fails (a returned object's ``__repr__`` is its code)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - an object whose repr fails (or an int too long to print)
        return "(unprintable)"
    return text if len(text) <= 60 else text[:59] + "…"


def checked_score(value) -> tuple[float | None, str | None]:
    """:func:`check_score` of a per-sample reward's result, made where the reward ran (``Call.post``)."""
    return check_score(value)


def checked_scores(values, none_allowed: bool = False) -> list[tuple[float | None, str | None]] | str:
    """:func:`check_score` of each score of a batch call's result, made where the reward ran; a reason string
    for a result that is not a list of scores."""
    try:
        values = list(values)
    except Exception:  # noqa: BLE001 - not iterable, or an iterator of the reward's that raised
        return f"returned {type(values).__name__}, not a list of scores"
    return [check_score(value, none_allowed=none_allowed) for value in values]


def checked_scores_or_none(values) -> list[tuple[float | None, str | None]] | str:
    """:func:`checked_scores` for TRL-style batched rewards, whose ``None`` means "does not apply"."""
    return checked_scores(values, none_allowed=True)


class _Scores:
    """The scores and errors of one batch, filled term by term."""

    def __init__(self, names: Sequence[str], count: int):
        self.count = count
        self.values: dict[str, list[float | None]] = {name: [0.0] * count for name in names}
        self.errors: list[dict[str, str]] = [{} for _ in range(count)]

    def set(self, name: str, index: int, checked: tuple[float | None, str | None]) -> None:
        """A score checked by :func:`check_score`, with its error if any."""
        self.values[name][index], error = checked
        if error is not None:
            self.errors[index][name] = error

    def set_all(self, name: str, checked: list | str) -> None:
        """One call's scores for the whole batch, checked by :func:`checked_scores`; the wrong count, or a
        result that is not a list, fails them all."""
        if isinstance(checked, str):
            self.fail(name, range(self.count), checked)
            return
        if len(checked) != self.count:
            self.fail(name, range(self.count), f"returned {len(checked)} scores for {self.count} completions")
            return
        for index, pair in enumerate(checked):
            self.set(name, index, pair)

    def fail(self, name: str, indices, reason: str) -> None:
        for index in indices:
            self.values[name][index] = 0.0
            self.errors[index][name] = reason

    def results(self, terms: Sequence[tuple[str, Callable, float]]) -> list[RewardResult]:
        results = []
        for i in range(self.count):
            components = {name: (0.0 if self.values[name][i] is None else self.values[name][i]) for name, _, _ in terms}
            total = sum(weight * components[name] for name, _, weight in terms)
            skipped = [name for name, _, _ in terms if self.values[name][i] is None]
            results.append(RewardResult(total=total, components=components, errors=self.errors[i],
                                        not_applicable=skipped))
        return results


@dataclass
class _Job:
    """A call bound for a helper process: term ``name`` for sample ``index``, or for the whole batch (None).
    ``per_sample`` is the per-sample function to fall back on if a ``batch_fn`` call overruns."""

    name: str
    call: Call
    index: int | None
    per_sample: Callable | None = None


class CombinedReward:
    """A weighted sum of reward terms, each called safely and, if ``timeout_s`` is set, under a hard time limit
    per completion (see the module docstring for where each term runs).

    Under a limit: a per-sample term is one call per completion, all in parallel; a TRL-style batched term is
    one call for the batch, under one limit; a ``batch_fn`` is one call for the batch under one limit and, if it
    overruns, each completion is scored on its own under the limit (so a hang costs about two limits).
    """

    def __init__(self, terms: Sequence[tuple[str, Callable, float]], *, timeout_s: float | None = None):
        if not terms:
            raise ValueError("a reward needs at least one term")
        names = [name for name, _, _ in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"reward term names must be unique, got {names}")
        for name, _, weight in terms:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"weight of reward term {name!r} must be a finite number, got {weight!r}")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
        self.terms = list(terms)
        self.timeout_s = timeout_s

    def score_many(self, completions: Sequence[str], samples: Sequence[Mapping],
                   prompts: Sequence[str] | None = None) -> list[RewardResult]:
        """Score a batch; batched terms are called once for the whole batch, the others per sample."""
        count = len(completions)
        if len(samples) != count or (prompts is not None and len(prompts) != count):
            raise ValueError(f"{count} completions but {len(samples)} samples / "
                             f"{'no' if prompts is None else len(prompts)} prompts")
        completions, samples = list(completions), list(samples)
        prompts = list(prompts) if prompts is not None else [""] * count
        scores = _Scores([name for name, _, _ in self.terms], count)
        jobs: list[_Job] = []
        for name, fn, _ in self.terms:
            jobs += self._score_term(name, fn, completions, samples, prompts, scores)
        while jobs:  # the helpers' share: all terms' calls in one parallel run (then batch_fn fallbacks)
            outcomes = run_calls([job.call for job in jobs], self.timeout_s)
            jobs = [retry for job, outcome in zip(jobs, outcomes)
                    for retry in self._take(job, outcome, completions, samples, scores)]
        return scores.results(self.terms)

    def _score_term(self, name: str, fn: Callable, completions: list[str], samples: list[Mapping],
                    prompts: list[str], scores: _Scores) -> list[_Job]:
        """Score one term in this thread where it may run here; return the calls bound for helpers."""
        count, limited = len(completions), self.timeout_s is not None
        if is_batched(fn):
            columns = {key: [s.get(key) for s in samples] for key in set().union(*samples)} if samples else {}
            columns.pop("prompts", None)
            columns.pop("completions", None)
            call = Call(fn, (prompts, completions), columns, post=checked_scores_or_none)
            if limited:
                return [_Job(name, call, None)]
            self._here(name, None, scores, call)
            return []
        batch_fn = getattr(fn, "batch_fn", None)
        if batch_fn is not None and count > 1:
            call = Call(batch_fn, (completions, samples), post=checked_scores)
            if limited:
                return [_Job(name, call, None, per_sample=fn)]
            self._here(name, None, scores, call)
            return []
        jobs = []
        for i in range(count):
            call = Call(fn, (completions[i], samples[i]), post=checked_score)
            if limited and not self._fits_here(fn, completions[i]):
                jobs.append(_Job(name, call, i))
            else:
                self._here(name, i, scores, call)
        return jobs

    def _fits_here(self, fn: Callable, completion: str) -> bool:
        """Whether a ``linear_time`` reward is sure to score ``completion`` within the limit in this thread."""
        return getattr(fn, "linear_time", False) and len(completion) <= self.timeout_s * LINEAR_CHARS_PER_S

    @staticmethod
    def _here(name: str, index: int | None, scores: _Scores, call: Call) -> None:
        """Make ``call`` in this thread and record its score (for the sample ``index``, or for the batch). A
        reward that raises, ``SystemExit`` included, scores 0 with the reason; only Ctrl-C gets through."""
        try:
            checked = call.post(call.fn(*call.args, **call.kwargs))
        except KeyboardInterrupt:  # the user stopping the run
            raise
        except BaseException as error:  # noqa: BLE001 - a failing reward scores 0, with the reason
            scores.fail(name, range(scores.count) if index is None else [index], describe_error(error))
            return
        if index is None:
            scores.set_all(name, checked)
        else:
            scores.set(name, index, checked)

    @staticmethod
    def _take(job: _Job, outcome: Outcome, completions: list[str], samples: list[Mapping],
              scores: _Scores) -> list[_Job]:
        """Record a helper's outcome; a ``batch_fn`` that overran comes back as one job per completion."""
        indices = range(scores.count) if job.index is None else [job.index]
        if outcome.timed_out and job.per_sample is not None:
            return [_Job(job.name, Call(job.per_sample, (completions[i], samples[i]), post=checked_score), i)
                    for i in indices]
        if outcome.error is not None:
            scores.fail(job.name, indices, outcome.error)
        elif job.index is None:
            scores.set_all(job.name, outcome.value)
        else:
            scores.set(job.name, job.index, outcome.value)
        return []

    def __call__(self, completion: str, sample: Mapping, prompt: str = "") -> RewardResult:
        return self.score_many([completion], [sample], [prompt])[0]

    def __repr__(self) -> str:
        return "CombinedReward(" + ", ".join(f"{n}×{w:g}" for n, _, w in self.terms) + ")"


def resolve_reward(spec: RewardSpec, *, timeout_s: float | None = None) -> CombinedReward:
    """Turn a reward name, a callable, or a weighted list ``[("math_verify", 1.0), ("format", 0.1)]`` into
    a :class:`CombinedReward`."""
    if isinstance(spec, CombinedReward):
        return spec
    if isinstance(spec, str):
        return CombinedReward([(spec, get_reward(spec), 1.0)], timeout_s=timeout_s)
    if callable(spec):
        return CombinedReward([(_term_name(spec), spec, 1.0)], timeout_s=timeout_s)
    if isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)):
        terms = []
        for item in spec:
            if not (isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2):
                raise ValueError(f"each weighted reward must be a (reward, weight) pair, got {item!r}")
            reward, weight = item
            if isinstance(reward, str):
                terms.append((reward, get_reward(reward), weight))
            elif callable(reward):
                terms.append((_term_name(reward), reward, weight))
            else:
                raise ValueError(f"a reward must be a registered name or a callable, got {reward!r}")
        return CombinedReward(terms, timeout_s=timeout_s)
    raise ValueError(f"reward must be a name, a callable or a list of (reward, weight) pairs, got {spec!r}")
