"""The code rewards (dare_gym.rewards.code): extraction, what runs in the program and what in the checker, the
benchmarks' own solutions, and forged answers.

Data tests need DARE_GYM_DATA_DIR (HumanEval, MBPP). Run with ``-s`` to see the measured numbers.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dare_gym.rewards import sandbox as sb
from dare_gym.rewards.base import get_reward
from dare_gym.rewards.code import (
    MAX_COMPLETION_CHARS,
    _mbpp_entry_point,
    code_humaneval,
    code_mbpp,
    execute_humaneval,
    extract_code,
    humaneval_check,
    humaneval_rewards,
    mbpp_check,
    mbpp_spec,
)

TIME_LIMIT_S = 5.0  # generous: a linear pass over a megabyte takes milliseconds; the old pattern took minutes

# ------------------------------------------------------------------------------------------------ extraction

_OLD_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.#-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_OLD_PYTHON = {"", "python", "py", "python3", "py3", "pycon", "ipython"}


def _old_extract_code(completion: str, entry_point: str | None = None) -> str:
    """The extraction before the linear scanner (a backtracking pattern): the reference for equal results."""
    text = completion.replace("\r\n", "\n").replace("\r", "\n")
    before, fence, after = text.partition("```")
    if fence and text.count("```") % 2 == 1 and before.strip() and not re.match(r"[ \t]*[A-Za-z]", after):
        text = "```\n" + text
    blocks = [(label.lower(), body) for label, body in _OLD_FENCE.findall(text)]
    if not blocks:
        return text
    python = [body for label, body in blocks if label in _OLD_PYTHON] or [body for _, body in blocks]
    if entry_point:
        defining = [b for b in python if re.search(rf"(?m)^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", b)]
        if defining:
            return defining[-1]
    return python[-1]


def test_extract_code_rules():
    assert extract_code("    return x + 1\n") == "    return x + 1\n"
    fenced = "Here:\n```python\ndef f(x):\n    return 1\n```\nand better:\n```python\ndef f(x):\n    return 2\n```\n"
    assert "return 2" in extract_code(fenced)
    both = "```python\ndef f(x):\n    return 1\n```\n```python\nprint(f(3))\n```"
    assert "return 1" in extract_code(both, entry_point="f")  # the block that defines the entry point
    assert "print" in extract_code(both)  # otherwise the last one
    assert extract_code("```\ndef g():\n    pass\n") == "def g():\n    pass\n"  # unclosed fence
    assert extract_code("```py\ncode\r\n```") == "code\n"
    assert extract_code("    return 3\n```\ntrailing prose") == "    return 3\n"  # the prompt opened it
    assert "def h" in extract_code("Sure:\n```python\ndef h():\n    pass\n")  # labelled, unclosed
    assert extract_code("```text\nprose\n```\n```\nx = 1\n```") == "x = 1\n"  # a Python (or bare) block first
    assert extract_code("``` python extra words\nx = 2\n```") == "x = 2\n"  # the label is the first word


_TOKENS = ["`", "``", "```", "\n", " ", "\t", "\r\n", "python", "py", "text", "x", "def f(", "async def f(",
           "#", "-", "r", "\n    return 1", "if __name__ == '__main__':"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=40).map("".join), st.sampled_from([None, "f", "g"]))
def test_extraction_gives_the_results_of_the_old_pattern(text, entry_point):
    assert extract_code(text, entry_point) == _old_extract_code(text, entry_point)


ADVERSARIAL = {
    "openers": "```",
    "labelled openers": "```python",
    "fences on lines": "```\n",
    "labelled blocks": "```python\n",
    "long info lines": "``` " + "a" * 1000,
    "def lines": "def f(\n",
    "async whitespace": "async \t \n",
    "main guards": "if __name__ == '__main__':\n",
    "mixed": "```py\ndef f(x):\n```\n`` `\n",
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_a_megabyte_of_repeated_fences_is_processed_quickly(name):
    unit = ADVERSARIAL[name]
    text = unit * ((1 << 20) // len(unit))
    record = {"prompt": "def f(x):\n    \"\"\"Add one.\"\"\"\n", "entry_point": "f",
              "test": "def check(candidate):\n    assert candidate(1) == 2\n"}
    mbpp = {"task_id": 1, "test_list": ["assert f(1) == 2"], "code": "def f(x):\n    return x + 1\n"}
    passes = {"extract": lambda: extract_code(text), "extract for f": lambda: extract_code(text, entry_point="f"),
              "HumanEval program": lambda: humaneval_check(record, text),
              "MBPP program": lambda: mbpp_check(mbpp, text)}
    for what, run in passes.items():
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        print(f"    {name}, {what}: {elapsed * 1000:.0f} ms for {len(text) / (1 << 20):.2f} MiB")
        assert elapsed < TIME_LIMIT_S  # a time LIMIT (the old pattern needed ~15-35 s for 128 KiB of openers)


def test_oversized_completions_are_refused_quickly_with_the_reason():
    record = {"prompt": "def f(x):\n", "entry_point": "f", "test": "def check(candidate):\n    assert True\n"}
    start = time.perf_counter()
    result = execute_humaneval("```" * (MAX_COMPLETION_CHARS // 3 + 1), record)
    assert time.perf_counter() - start < TIME_LIMIT_S
    assert not result.passed and f"at most {MAX_COMPLETION_CHARS}" in result.reason
    assert code_humaneval("x" * (MAX_COMPLETION_CHARS + 1), record) == 0.0
    assert humaneval_rewards(["x" * (MAX_COMPLETION_CHARS + 1)], [record]) == [0.0]


# ------------------------------------------------------------------------------------------------ assembly

RECORD = {
    "prompt": "from typing import List\n\n\ndef inc(xs: List[int]) -> List[int]:\n    \"\"\"Add one.\"\"\"\n",
    "entry_point": "inc",
    "test": "def check(candidate):\n    assert candidate([1]) == [2]\n",
}


def test_humaneval_check_assembly():
    solution, spec = humaneval_check(RECORD, "    return [x + 1 for x in xs]\n")
    assert solution == RECORD["prompt"] + "    return [x + 1 for x in xs]\n"
    assert "check" not in solution and "candidate" not in solution  # the tests never enter the program
    assert spec.prelude == "from typing import List\n\n\n" and spec.functions == ("inc",)
    assert spec.test.endswith("check(inc)\n") and "def check(candidate)" in spec.test
    full = "```python\ndef inc(xs):\n    return [x + 1 for x in xs]\n\nif __name__ == '__main__':\n    input()\n```"
    program, _ = humaneval_check(RECORD, full)
    assert "input()" not in program and "from typing import List" in program
    assert program.count("def inc(") == 1  # the prompt's stub is replaced, its header kept
    assert code_humaneval(full, RECORD) == 1.0
    assert code_humaneval("    return [x + 1 for x in xs]\n", RECORD) == 1.0
    bodyless = dict(RECORD, prompt="import math\n\ndef inc(xs):\n")  # a prompt without a docstring
    assert code_humaneval("def inc(xs):\n    return [x + 1 for x in xs]\n", bodyless) == 1.0
    assert code_humaneval("    return xs\n", RECORD) == 0.0


def test_humaneval_helpers_come_from_the_prompt_not_the_completion():
    # HumanEval/38-style: the test calls the prompt's encode(); a completion that redefines it (to make its own
    # decode trivially right) does not change the encode() the checker uses
    record = {
        "prompt": "def encode(s):\n    return s[::-1]\n\n\ndef decode(s):\n    \"\"\"Invert encode.\"\"\"\n",
        "entry_point": "decode",
        "test": "def check(candidate):\n    for s in ['abc', 'hello']:\n        assert candidate(encode(s)) == s\n",
    }
    assert code_humaneval("    return s[::-1]\n", record) == 1.0
    cheat = "def encode(s):\n    return s\n\n\ndef decode(s):\n    return s\n"
    assert code_humaneval(cheat, record) == 0.0


def test_mbpp_check_assembly():
    record = {"task_id": 2, "text": "", "code": "def sq(x):\r\n    return x * x", "test_setup_code": "import math",
              "test_list": ["assert sq(3) == 9", "assert sq(-2) == 4", "assert math.isclose(sq(0.5), 0.25)"],
              "challenge_test_list": []}
    assert _mbpp_entry_point(record) == "sq"
    program, spec = mbpp_check(record, record["code"])
    assert "\r" not in program and "assert" not in program
    assert spec.functions == ("sq",) and spec.prelude == "import math" and spec.program_setup == "import math"
    assert code_mbpp(record["code"], record) == 1.0
    assert code_mbpp("```python\ndef sq(x):\n    return x + x\n```", record) == 0.0
    with pytest.raises(ValueError, match="no tests"):
        mbpp_spec({"task_id": 7, "test_list": []})


def test_mbpp_specs_of_the_records_that_need_care():
    # a builtin's name the solution redefines, a module the asserts use, objects built by the setup
    shadow = mbpp_spec({"task_id": 126, "code": "def sum(a, b):\n    return 6",
                        "test_list": ["assert sum(10,15) == 6"]})
    assert shadow.functions == ("sum",)
    module = mbpp_spec({"task_id": 596, "code": "import sys\ndef size(t):\n    return sys.getsizeof(t)",
                        "test_list": ["assert size((1, 2)) == sys.getsizeof((1, 2))"]})
    assert module.functions == ("size",) and module.modules == ("sys",)
    tree = mbpp_spec({"task_id": 367, "code": "class Node:\n    pass\ndef depth(n):\n    return 0",
                      "test_setup_code": "root = Node(1)\nroot.left = Node(2)\nroot1 = Node(3)",
                      "test_list": ["assert depth(root) == 2", "assert depth(root1) == 1"]})
    assert tree.functions == ("depth",) and tree.remote_names == ("root", "root1") and tree.prelude == ""
    assert tree.program_setup.startswith("root = Node(1)")
    builtins_only = mbpp_spec({"task_id": 9, "code": "def f(x):\n    return x",
                               "test_list": ["assert len(f([1])) == 1"]})
    assert builtins_only.functions == ("f",)  # len stays the checker's own


def test_rewards_are_registered_and_never_raise():
    assert get_reward("humaneval") is code_humaneval and get_reward("mbpp") is code_mbpp
    for reward in (code_humaneval, code_mbpp):
        assert reward("anything", {}) == 0.0
        assert reward(None, {"prompt": 1}) == 0.0  # type: ignore[arg-type]
    assert code_mbpp("x = 1\n", {"task_id": 1, "test_list": []}) == 0.0  # nothing to verify: never a pass
    assert code_humaneval("    return 1\n", {"prompt": "def f():\n", "entry_point": "f"}) == 0.0  # no test


# ------------------------------------------------------------------------------------------------ benchmarks


def _humaneval(data_dir: Path) -> list[dict]:
    path = data_dir / "humaneval" / "HumanEval.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def _mbpp_test_split(data_dir: Path) -> list[dict]:
    path = data_dir / "mbpp" / "mbpp.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if 11 <= int(r["task_id"]) <= 510]


def test_humaneval_canonical_solutions_pass_and_bare_prompts_fail(data_dir):
    records = _humaneval(data_dir)
    assert len(records) == 164
    limits = sb.SandboxLimits(timeout_s=30.0)  # generous: the test machine may be busy
    start = time.monotonic()
    results = sb.check_programs([humaneval_check(r, r["canonical_solution"]) for r in records], limits, workers=2)
    wall = time.monotonic() - start
    misses = [(r["task_id"], res.status, res.reason) for r, res in zip(records, results) if not res.passed]
    print(f"\n    HumanEval canonical: {len(records) - len(misses)}/164 pass in {wall:.2f}s with 2 workers")
    assert misses == [], misses

    bare = sb.check_programs([humaneval_check(r, "") for r in records], limits, workers=2)
    passing = [(r["task_id"], res.reason) for r, res in zip(records, bare) if res.passed]
    assert passing == [], passing
    assert all(res.status == "failed" for res in bare), [(r["task_id"], res.status, res.reason)
                                                          for r, res in zip(records, bare) if res.status != "failed"]


def test_humaneval_reward_reads_no_answer_key(data_dir):
    records = _humaneval(data_dir)
    record = records[0]
    path = data_dir / "humaneval" / "HumanEval.jsonl.gz"
    cheat = (f"    import gzip, json\n    for line in gzip.open({str(path)!r}, 'rt'):\n"
             f"        r = json.loads(line)\n        if r['task_id'] == {record['task_id']!r}:\n"
             f"            exec(r['prompt'] + r['canonical_solution'], globals())\n"
             f"            return {record['entry_point']}(numbers, threshold)\n")
    assert code_humaneval(record["canonical_solution"], record) == 1.0
    old = os.environ.get("DARE_GYM_DATA_DIR")
    os.environ["DARE_GYM_DATA_DIR"] = str(data_dir)
    try:
        assert code_humaneval(cheat, record) == 0.0
    finally:
        if old is None:
            del os.environ["DARE_GYM_DATA_DIR"]
        else:
            os.environ["DARE_GYM_DATA_DIR"] = old


def test_mbpp_reference_code_passes_and_forged_answers_fail(data_dir):
    records = _mbpp_test_split(data_dir)
    assert len(records) == 500
    limits = sb.SandboxLimits(timeout_s=30.0)  # task 123 needs seconds of CPU; the test machine may be busy
    start = time.monotonic()
    results = sb.check_programs([mbpp_check(r, r["code"]) for r in records], limits, workers=2)
    wall = time.monotonic() - start
    misses = [(r["task_id"], res.status, res.reason) for r, res in zip(records, results) if not res.passed]
    print(f"\n    MBPP reference: {500 - len(misses)}/500 pass in {wall:.2f}s with 2 workers; misses: {misses}")
    assert misses == [], misses

    # the same code, then the entry point replaced by one returning an object equal to everything: it used to
    # pass (the tests compared the program's own object); it never reaches the checker now
    forged = []
    for record in records:
        name = _mbpp_entry_point(record)
        assert name, record["task_id"]
        forged.append(record["code"] + "\n\n\nclass _Anything:\n    __eq__ = lambda self, other: True\n"
                      "    __ne__ = lambda self, other: False\n    __bool__ = lambda self: True\n"
                      f"    __hash__ = object.__hash__\n\n\ndef {name}(*args, **kwargs):\n    return _Anything()\n")
    results = sb.check_programs([mbpp_check(r, f) for r, f in zip(records, forged)], limits, workers=2)
    passing = [r["task_id"] for r, res in zip(records, results) if res.passed]
    unplain = sum("not plain data" in res.reason for res in results)
    print(f"    MBPP forged: {len(passing)}/500 pass ({unplain} refused as not plain data)")
    assert passing == [], passing
