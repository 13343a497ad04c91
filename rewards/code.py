"""Code rewards for HumanEval and MBPP: pull the code out of a completion, assemble the program with the
benchmark's tests, and run it in the sandbox (:mod:`dare_gym.rewards.sandbox`). 1.0 if it passes, else 0.0.

Completion formats (:func:`extract_code`):

* fenced: if the completion holds one or more fenced blocks (```` ```python ```` ... ```` ``` ````, or a bare
  ```` ``` ````, an unclosed last fence running to the end), the code is the LAST block that defines the entry
  point when one is known, else the last Python (or unlabelled) block;
* a completion that starts with code and closes a block the prompt opened (an odd number of fences, the
  first one bare, code before it) is read as if it began with a fence;
* raw: otherwise the completion itself, read as raw code (HumanEval style: a function body that continues the
  prompt, or a whole function).

A top-level ``if __name__ == "__main__":`` block in the extracted code is dropped (demo code that would read
stdin and fail).

HumanEval (:func:`humaneval_program`): if the code defines the entry point at top level it is a whole function:
the program is the prompt's header (everything before the entry point's ``def``: imports and helper functions)
followed by the code; otherwise the code is a body and the program is ``prompt + body``. Then the record's
``test`` and ``check(entry_point)``.

MBPP (:func:`mbpp_program`): the code, then ``test_setup_code``, then the ``test_list`` asserts (optionally the
``challenge_test_list`` too). The setup goes AFTER the code because the dataset's setups use classes that the
solution defines (task 367 builds a tree of ``Node`` objects); a setup that only imports works in either order.
MBPP's ``\\r\\n`` line endings are normalized.

Rewards never raise: anything that goes wrong scores 0.0.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import os
import re
from typing import Mapping, Sequence

from dare_gym.rewards.base import register_reward
from dare_gym.rewards.sandbox import ExecutionResult, SandboxLimits, run_program, run_programs

__all__ = [
    "DEFAULT_LIMITS",
    "extract_code",
    "humaneval_program",
    "mbpp_program",
    "code_humaneval",
    "code_mbpp",
    "execute_humaneval",
    "execute_mbpp",
    "humaneval_rewards",
    "mbpp_rewards",
]

DEFAULT_LIMITS = SandboxLimits(timeout_s=10.0)
"""Limits of every reward run. The folder named by ``DARE_GYM_DATA_DIR`` (the benchmarks' answer keys) is added
to ``hidden_paths`` at call time, so a completion cannot read the canonical solutions."""

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.#-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_LABELS = {"", "python", "py", "python3", "py3", "pycon", "ipython"}
_MAIN_GUARD = re.compile(r"""^if\s+__name__\s*==\s*(['"])__main__\1\s*:""")
_BUILTIN_NAMES = set(dir(builtins))


def _normalize(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _defines(code: str, name: str) -> bool:
    return re.search(rf"(?m)^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code) is not None


def extract_code(completion: str, entry_point: str | None = None) -> str:
    """The code of a completion (see the module docstring for the rules)."""
    text = _normalize(completion)
    before, fence, after = text.partition("```")
    if fence and text.count("```") % 2 == 1 and before.strip() and not re.match(r"[ \t]*[A-Za-z]", after):
        # an odd number of fences, code before the first one, and that one is bare: the prompt opened the
        # block and the completion closes it
        text = "```\n" + text
    blocks = [(label.lower(), body) for label, body in _FENCE.findall(text)]
    if not blocks:
        return text
    python_blocks = [body for label, body in blocks if label in _PYTHON_LABELS] or [body for _, body in blocks]
    if entry_point:
        defining = [body for body in python_blocks if _defines(body, entry_point)]
        if defining:
            return defining[-1]
    return python_blocks[-1]


def _strip_main_guard(code: str) -> str:
    """Drop top-level ``if __name__ == "__main__":`` blocks (with their ``elif``/``else`` parts)."""
    lines = code.split("\n")
    kept: list[str] = []
    skipping = False
    for line in lines:
        top_level = bool(line) and not line[0].isspace() and not line.startswith("#")
        if _MAIN_GUARD.match(line):
            skipping = True
            continue
        if skipping:
            if top_level and not re.match(r"(elif\b|else\s*:)", line):
                skipping = False
            else:
                continue
        kept.append(line)
    return "\n".join(kept)


def humaneval_program(record: Mapping, completion: str) -> str:
    """The full HumanEval program for ``completion``: prompt + code (or body), the test, ``check(entry_point)``."""
    prompt = _normalize(record["prompt"])
    entry_point = record["entry_point"]
    code = _strip_main_guard(extract_code(completion, entry_point))
    if _defines(code, entry_point):
        stubs = list(re.finditer(rf"(?m)^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", prompt))
        header = prompt[:stubs[-1].start()] if stubs else prompt
        solution = (header.rstrip("\n") + "\n\n\n" if header.strip() else "") + code
    else:
        solution = prompt + code
    return f"{solution.rstrip()}\n\n\n{_normalize(record['test']).strip()}\n\n\ncheck({entry_point})\n"


def _mbpp_entry_point(record: Mapping) -> str | None:
    """The function the asserts call most, e.g. ``remove_Occ``: builtins and methods are ignored unless nothing
    else is called (task 126 defines its own ``sum``)."""
    names: collections.Counter = collections.Counter()
    shadowed: collections.Counter = collections.Counter()
    for test in record.get("test_list") or []:
        for match in re.finditer(r"(?<![\w.])([A-Za-z_]\w*)\s*\(", test):
            (shadowed if match.group(1) in _BUILTIN_NAMES else names)[match.group(1)] += 1
    best = names or shadowed
    return best.most_common(1)[0][0] if best else None


def mbpp_program(record: Mapping, completion: str, *, include_challenge: bool = False) -> str:
    """The full MBPP program: the code, ``test_setup_code``, then the asserts of ``test_list``."""
    code = _strip_main_guard(extract_code(completion, _mbpp_entry_point(record)))
    tests: list[str] = list(record.get("test_list") or [])
    if include_challenge:
        tests += list(record.get("challenge_test_list") or [])
    if not any(str(t).strip() for t in tests):
        raise ValueError(f"MBPP record {record.get('task_id')!r} has no tests: nothing to verify")
    setup = _normalize(record.get("test_setup_code") or "").strip()
    parts = [code.rstrip(), setup, "\n".join(_normalize(t).strip() for t in tests)]
    return "\n\n\n".join(p for p in parts if p) + "\n"


def _limits() -> SandboxLimits:
    data_dir = os.environ.get("DARE_GYM_DATA_DIR")
    if data_dir and os.path.isdir(data_dir) and data_dir not in DEFAULT_LIMITS.hidden_paths:
        return dataclasses.replace(DEFAULT_LIMITS, hidden_paths=(*DEFAULT_LIMITS.hidden_paths, data_dir))
    return DEFAULT_LIMITS


def _record(sample: Mapping) -> Mapping:
    """The benchmark record: the sample itself, or a ``record`` field of it when an environment wraps it."""
    if "test" not in sample and "test_list" not in sample and isinstance(sample.get("record"), Mapping):
        return sample["record"]
    return sample


def execute_humaneval(completion: str, sample: Mapping, limits: SandboxLimits | None = None) -> ExecutionResult:
    """Run a HumanEval completion and return the sandbox's full result (reason, output, timing)."""
    return run_program(humaneval_program(_record(sample), completion), limits or _limits())


def execute_mbpp(completion: str, sample: Mapping, limits: SandboxLimits | None = None) -> ExecutionResult:
    """Run an MBPP completion and return the sandbox's full result (reason, output, timing)."""
    return run_program(mbpp_program(_record(sample), completion), limits or _limits())


@register_reward("humaneval")
def code_humaneval(completion: str, sample: Mapping) -> float:
    """1.0 if the completion passes the HumanEval record's tests in the sandbox, else 0.0; never raises."""
    try:
        return 1.0 if execute_humaneval(completion, sample).passed else 0.0
    except Exception:
        return 0.0


@register_reward("mbpp")
def code_mbpp(completion: str, sample: Mapping) -> float:
    """1.0 if the completion passes the MBPP record's ``test_list`` in the sandbox, else 0.0; never raises."""
    try:
        return 1.0 if execute_mbpp(completion, sample).passed else 0.0
    except Exception:
        return 0.0


def _batch(build, completions: Sequence[str], samples: Sequence[Mapping], workers: int) -> list[float]:
    if len(completions) != len(samples):
        raise ValueError(f"{len(completions)} completions for {len(samples)} samples")
    programs: list[str | None] = []
    for completion, sample in zip(completions, samples):
        try:
            programs.append(build(_record(sample), completion))
        except Exception:
            programs.append(None)
    runnable = [p for p in programs if p is not None]
    try:
        results = iter(run_programs(runnable, _limits(), workers=workers))
    except Exception:
        return [0.0] * len(programs)
    return [0.0 if p is None else (1.0 if next(results).passed else 0.0) for p in programs]


def humaneval_rewards(completions: Sequence[str], samples: Sequence[Mapping], workers: int = 2) -> list[float]:
    """Score a batch of HumanEval completions, ``workers`` sandboxes at a time."""
    return _batch(humaneval_program, completions, samples, workers)


def mbpp_rewards(completions: Sequence[str], samples: Sequence[Mapping], workers: int = 2) -> list[float]:
    """Score a batch of MBPP completions, ``workers`` sandboxes at a time."""
    return _batch(mbpp_program, completions, samples, workers)


code_humaneval.batch_fn = humaneval_rewards  # score many completions in parallel sandboxes
code_mbpp.batch_fn = mbpp_rewards
