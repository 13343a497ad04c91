"""Code rewards for HumanEval and MBPP: pull the code out of a completion, run it in the sandbox, and judge it
by the benchmark's tests run in a separate trusted checker (:func:`dare_gym.rewards.sandbox.check_program`).
1.0 if it passes, else 0.0.

Completion formats (:func:`extract_code`):

* fenced: if the completion holds one or more fenced blocks (```` ```python ```` ... ```` ``` ````, or a bare
  ```` ``` ````, an unclosed last fence running to the end), the code is the LAST block that defines the entry
  point when one is known, else the last Python (or unlabelled) block;
* a completion that starts with code and closes a block the prompt opened (an odd number of fences, the
  first one bare, code before it) is read as if it began with a fence;
* raw: otherwise the completion itself, read as raw code (HumanEval style: a function body that continues the
  prompt, or a whole function).

A top-level ``if __name__ == "__main__":`` block in the extracted code is dropped (demo code that would read
stdin and fail). Every step over the completion's text is linear in its length (fences are found by a
scanner, not by a backtracking pattern), so a megabyte of repeated fences costs milliseconds.

What runs where (see :mod:`dare_gym.rewards.sandbox` for why this verdict cannot be forged):

* HumanEval (:func:`humaneval_check`). The program is the prompt's header (everything before the entry
  point's ``def``: imports and helper functions) followed by the code when the code defines the entry point
  at top level (a whole function), else ``prompt + code`` (a body). The checker runs that same trusted header
  (so HumanEval/32's ``poly`` and /38's ``encode_cyclic``, which the tests call, are the prompt's, whatever
  the completion redefines), then the record's ``test`` and ``check(entry_point)`` with ``entry_point`` bound
  to a proxy of the program's function.
* MBPP (:func:`mbpp_check`). The program is the code. The checker runs the ``test_list`` asserts (optionally
  ``challenge_test_list`` too) with every name they call bound to a proxy of the program's function of that
  name, except builtins the reference solution does not redefine (task 126 defines its own ``sum``); names the
  asserts use as modules (task 596's ``sys``) are imported in the checker. ``test_setup_code`` runs in the
  checker when it needs nothing of the solution (imports); it also runs in the program, after the code, as it
  always did (a solution may rely on the setup's imports). A setup that uses the solution's own classes (tasks
  367 and 927 build trees of the solution's ``Node``) runs ONLY in the program: what it binds (``root``,
  ``root1``...) reaches the checker as references that calls pass back, never as objects, and the results are
  plain data as always. This gives up nothing of soundness: the setup only builds the inputs, the program
  sees its inputs anyway, and the expected answers stay in the checker. What it gives up: an assert that
  used a solution's object other than by calling a function with it (an attribute, a comparison) cannot be
  checked; no MBPP record does. MBPP's ``\\r\\n`` line endings are normalized.

Rewards never raise: anything that goes wrong scores 0.0.
"""

from __future__ import annotations

import ast
import builtins
import collections
import re
import sys
import warnings
from typing import Mapping, Sequence

from dare_gym.rewards.base import register_reward
from dare_gym.rewards.sandbox import CheckSpec, ExecutionResult, SandboxLimits, check_program, check_programs

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_COMPLETION_CHARS",
    "extract_code",
    "humaneval_check",
    "mbpp_check",
    "mbpp_spec",
    "code_humaneval",
    "code_mbpp",
    "execute_humaneval",
    "execute_mbpp",
    "humaneval_rewards",
    "mbpp_rewards",
]

DEFAULT_LIMITS = SandboxLimits(timeout_s=10.0)
"""Limits of every reward run. No answer key needs hiding: the program sees only the sandbox's allow-list
(:func:`dare_gym.rewards.sandbox.allow_list`), never ``DARE_GYM_DATA_DIR``, a ``data_files=`` copy of a
benchmark or any other file of the host, whatever limits are passed."""

MAX_COMPLETION_CHARS = 1 << 20
"""Longer completions score 0.0 without running, with the reason. Extraction is linear, so this is not about
time in this process: it bounds what one completion costs the sandbox (a megabyte of code takes about half a
second to compile and judge; eight megabytes of statements took 4 s and ran out of the 1 GiB address space
while compiling). No model this project trains writes that much."""

_FENCE = "```"
_FENCE_LABEL = re.compile(r"[ \t]*([A-Za-z0-9_+.#-]*)")  # one anchored match per fence: linear
_PYTHON_LABELS = {"", "python", "py", "python3", "py3", "pycon", "ipython"}
_MAIN_GUARD = re.compile(r"""^if\s+__name__\s*==\s*(['"])__main__\1\s*:""")
_BUILTIN_NAMES = frozenset(dir(builtins))


def _normalize(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _definition_pattern(name: str) -> re.Pattern:
    """Top-level ``def name(`` lines (one anchored pattern with no nested repetition: linear)."""
    return re.compile(rf"(?m)^(?:async\s+)?def\s+{re.escape(name)}\s*\(")


def _defines(code: str, name: str) -> bool:
    return _definition_pattern(name).search(code) is not None


def _fence_spans(text: str) -> list[tuple[int, int, int, int]]:
    """``(info_start, info_end, body_start, body_end)`` of every fenced block, in order; an unclosed last fence
    runs to the end.

    A scanner over ``str.find``: each search starts where the previous one ended, so the whole pass is linear
    in ``len(text)``. A fence opens a block only if a newline follows it somewhere: the text up to that newline
    is its info line, whose leading ``[A-Za-z0-9_+.#-]*`` (after spaces and tabs) is the block's label.
    """
    spans = []
    width = len(_FENCE)
    start = text.find(_FENCE)
    while start != -1:
        line_end = text.find("\n", start + width)
        if line_end == -1:
            break
        close = text.find(_FENCE, line_end + 1)
        if close == -1:
            spans.append((start + width, line_end, line_end + 1, len(text)))
            break
        spans.append((start + width, line_end, line_end + 1, close))
        start = text.find(_FENCE, close + width)
    return spans


def extract_code(completion: str, entry_point: str | None = None) -> str:
    """The code of a completion (see the module docstring for the rules); linear in its length."""
    text = _normalize(completion)
    before, fence, after = text.partition(_FENCE)
    if fence and text.count(_FENCE) % 2 == 1 and before.strip() and not re.match(r"[ \t]*[A-Za-z]", after):
        # an odd number of fences, code before the first one, and that one is bare: the prompt opened the
        # block and the completion closes it
        text = "```\n" + text
    spans = _fence_spans(text)
    if not spans:
        return text

    def is_python(span) -> bool:
        return _FENCE_LABEL.match(text, span[0], span[1]).group(1).lower() in _PYTHON_LABELS

    # the Python (or unlabelled) blocks if there are any, else all; latest first (labels read lazily)
    only_python = any(is_python(span) for span in reversed(spans))
    candidates = [span for span in reversed(spans) if not only_python or is_python(span)]
    if entry_point:
        pattern = _definition_pattern(entry_point)
        for _, _, body_start, body_end in candidates:
            if text.find(entry_point, body_start, body_end) != -1 and pattern.search(text, body_start, body_end):
                return text[body_start:body_end]
    return text[candidates[0][2]:candidates[0][3]]


def _strip_main_guard(code: str) -> str:
    """Drop top-level ``if __name__ == "__main__":`` blocks (with their ``elif``/``else`` parts)."""
    if "__main__" not in code:
        return code
    kept: list[str] = []
    skipping = False
    for line in code.split("\n"):
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


# ------------------------------------------------------------------------------------------------ HumanEval


def humaneval_check(record: Mapping, completion: str) -> tuple[str, CheckSpec]:
    """The program to sandbox for ``completion`` and the trusted check of the HumanEval record."""
    prompt = _normalize(record["prompt"])
    entry_point = record["entry_point"]
    stubs = list(_definition_pattern(entry_point).finditer(prompt))
    header = prompt[:stubs[-1].start()] if stubs else prompt
    code = _strip_main_guard(extract_code(completion, entry_point))
    if _defines(code, entry_point):
        solution = (header.rstrip("\n") + "\n\n\n" if header.strip() else "") + code
    else:
        solution = prompt + code
    test = f"{_normalize(record['test']).strip()}\n\n\ncheck({entry_point})\n"
    return solution, CheckSpec(prelude=header if stubs else "", test=test, functions=(entry_point,))


# ------------------------------------------------------------------------------------------------ MBPP


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


def _free_and_bound(source: str) -> tuple[set[str], list[str]]:
    """Names ``source`` reads without binding them anywhere, and the names it binds at top level (in order)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ast.parse(source)
    loaded, bound = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    top_level = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if isinstance(target, ast.Name) and target.id not in top_level:
                top_level.append(target.id)
    return loaded - bound, top_level


def _reference_definitions(code: str) -> tuple[set[str], set[str]]:
    """Names the (trusted) reference solution defines at top level (functions, classes, assignments), and which
    of them are classes; empty if it does not parse."""
    try:
        with warnings.catch_warnings():  # old escapes like "\w" in the dataset's code are not our warnings
            warnings.simplefilter("ignore")
            tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return set(), set()
    names, classes = set(), set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                classes.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names, classes


def mbpp_spec(record: Mapping, include_challenge: bool = False) -> CheckSpec:
    """The trusted check of an MBPP record (see the module docstring for what runs where)."""
    tests = list(record.get("test_list") or [])
    if include_challenge:
        tests += list(record.get("challenge_test_list") or [])
    test = "\n".join(_normalize(str(t)).strip() for t in tests)
    if not test.strip():
        raise ValueError(f"MBPP record {record.get('task_id')!r} has no tests: nothing to verify")
    setup = _normalize(record.get("test_setup_code") or "").strip()
    setup_free, setup_bound = _free_and_bound(setup) if setup else (set(), [])
    uses_solution = any(n not in _BUILTIN_NAMES and n not in sys.stdlib_module_names for n in setup_free)
    remote = tuple(setup_bound) if uses_solution else ()
    checker_side = set(remote) if uses_solution else set(setup_bound)
    reference, classes = _reference_definitions(_normalize(record.get("code") or ""))
    functions, modules = [], []
    for name in sorted(_free_and_bound(test)[0] - checker_side):
        if name in reference:  # the solution's function, even under a builtin's name (task 126's sum)
            functions.append(name)
        elif name in sys.stdlib_module_names:  # a module the asserts use (task 596's sys)
            modules.append(name)
        elif name not in _BUILTIN_NAMES:  # the solution must define it
            functions.append(name)
    return CheckSpec(test=test, prelude="" if uses_solution else setup, functions=tuple(functions),
                     modules=tuple(modules), program_setup=setup, remote_names=remote,
                     constructors=tuple(name for name in functions if name in classes))


def mbpp_check(record: Mapping, completion: str, *, include_challenge: bool = False) -> tuple[str, CheckSpec]:
    """The program to sandbox for ``completion`` (its code) and the trusted check of the MBPP record."""
    spec = mbpp_spec(record, include_challenge)
    return _strip_main_guard(extract_code(completion, _mbpp_entry_point(record))), spec


# ------------------------------------------------------------------------------------------------ rewards


def _record(sample: Mapping) -> Mapping:
    """The benchmark record: the sample itself, or a ``record`` field of it when an environment wraps it."""
    if "test" not in sample and "test_list" not in sample and isinstance(sample.get("record"), Mapping):
        return sample["record"]
    return sample


def _refusal(completion: str) -> str | None:
    """Why a completion is not run at all, or None."""
    if not isinstance(completion, str):
        return f"a completion must be a str, got {type(completion).__name__}"
    if len(completion) > MAX_COMPLETION_CHARS:
        return f"the completion has {len(completion)} characters; code rewards read at most {MAX_COMPLETION_CHARS}"
    return None


def _execute(build, completion: str, sample: Mapping, limits: SandboxLimits | None) -> ExecutionResult:
    refusal = _refusal(completion)
    if refusal is not None:
        return ExecutionResult(False, "failed", None, "", "", 0.0, refusal)
    return check_program(*build(_record(sample), completion), limits or DEFAULT_LIMITS)


def execute_humaneval(completion: str, sample: Mapping, limits: SandboxLimits | None = None) -> ExecutionResult:
    """Run a HumanEval completion and return the sandbox's full result (reason, output, timing)."""
    return _execute(humaneval_check, completion, sample, limits)


def execute_mbpp(completion: str, sample: Mapping, limits: SandboxLimits | None = None) -> ExecutionResult:
    """Run an MBPP completion and return the sandbox's full result (reason, output, timing)."""
    return _execute(mbpp_check, completion, sample, limits)


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
    jobs: list[tuple[str, CheckSpec] | None] = []
    for completion, sample in zip(completions, samples):
        try:
            jobs.append(None if _refusal(completion) else build(_record(sample), completion))
        except Exception:
            jobs.append(None)
    runnable = [job for job in jobs if job is not None]
    try:
        results = iter(check_programs(runnable, DEFAULT_LIMITS, workers=workers))
    except Exception:
        return [0.0] * len(jobs)
    return [0.0 if job is None else (1.0 if next(results).passed else 0.0) for job in jobs]


def humaneval_rewards(completions: Sequence[str], samples: Sequence[Mapping], workers: int = 2) -> list[float]:
    """Score a batch of HumanEval completions, ``workers`` sandboxes at a time."""
    return _batch(humaneval_check, completions, samples, workers)


def mbpp_rewards(completions: Sequence[str], samples: Sequence[Mapping], workers: int = 2) -> list[float]:
    """Score a batch of MBPP completions, ``workers`` sandboxes at a time."""
    return _batch(mbpp_check, completions, samples, workers)


code_humaneval.batch_fn = humaneval_rewards  # score many completions in parallel sandboxes
code_mbpp.batch_fn = mbpp_rewards
