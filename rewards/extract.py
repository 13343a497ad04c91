"""Text extraction for the rewards, in time linear in the completion's length.

A reward reads attacker-controlled text: the policy can emit a megabyte of ``<answer>`` or ``\\boxed{`` just as
easily as a real answer. A lazy regex such as ``<answer>(.*?)</answer>`` rescans the rest of the text from every
opener that has no closer, which is quadratic (128 KiB of repeated openers took 20 s); the scanners here walk
the text a bounded number of times instead, with ``str.find`` or with regexes that cannot backtrack (a literal,
or a single character class), and give the same results as the regexes they replace on every input.
"""

from __future__ import annotations

import itertools
import re
from typing import Iterator

_SPACES = re.compile(r"\s*")
# A literal, then whitespace runs each followed by a literal or a non-space: a failed try backtracks over one
# whitespace run only, and the runs after different "</reasoning>" tags do not overlap.
_REASONING_THEN_ANSWER = re.compile(r"</reasoning>\s*<answer>\s*\S")
_BRACE_RUNS = re.compile(r"\{+|\}+")
_ASCII_DIGIT = re.compile(r"[0-9]")
_GSM8K_MARKER = re.compile(r"####\s*([^\n]*)")  # \s* then [^\n]*, which always matches: no backtracking
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")  # the optional tail always matches: no backtracking


def _finder(tag: str, ignore_case: bool):
    """``find(text, start) -> (tag_start, tag_end)`` or None: the next occurrence of ``tag`` at or after ``start``."""
    if ignore_case:
        pattern = re.compile(re.escape(tag), re.IGNORECASE)

        def find(text: str, start: int):
            match = pattern.search(text, start)
            return None if match is None else match.span()
    else:

        def find(text: str, start: int):
            index = text.find(tag, start)
            return None if index < 0 else (index, index + len(tag))

    return find


def iter_tag_blocks(text: str, open_tag: str = "<answer>", close_tag: str = "</answer>", *,
                    ignore_case: bool = False) -> Iterator[str]:
    """The contents of the ``open_tag … close_tag`` blocks, left to right, each ended by the first ``close_tag``
    after its opener: the blocks ``re.findall(open_tag + "(.*?)" + close_tag, re.DOTALL)`` finds.

    Once an opener has no closer after it, no later opener can have one either, so the scan stops there: each
    character is looked at a bounded number of times.
    """
    find_open, find_close = _finder(open_tag, ignore_case), _finder(close_tag, ignore_case)
    position = 0
    while True:
        opener = find_open(text, position)
        if opener is None:
            return
        closer = find_close(text, opener[1])
        if closer is None:
            return
        yield text[opener[1]:closer[0]]
        position = closer[1]


def last_tag_block(text: str, open_tag: str = "<answer>", close_tag: str = "</answer>", *,
                   ignore_case: bool = False) -> str | None:
    """The content of the last block :func:`iter_tag_blocks` finds, or None if there is none.

    Case-sensitive tags (which must not overlap themselves or each other, as ``<answer>`` and ``</answer>``
    cannot) are found from the end with a few ``str.find`` scans: the last block ends at the first closer after
    the last opener that has a closer after it, and starts at the first opener after the closer before that
    opener (every earlier opener is paired with a closer by then).
    """
    if ignore_case:
        last = None
        for last in iter_tag_blocks(text, open_tag, close_tag, ignore_case=True):
            pass
        return last
    last_close = text.rfind(close_tag)
    last_open = text.rfind(open_tag, 0, last_close) if last_close >= 0 else -1
    if last_open < 0:
        return None
    end = text.find(close_tag, last_open + len(open_tag))
    previous_close = text.rfind(close_tag, 0, last_open)
    start = text.find(open_tag, previous_close + len(close_tag) if previous_close >= 0 else 0)
    return text[start + len(open_tag):end]


def skip_spaces(text: str, position: int) -> int:
    """The first index at or after ``position`` that is not whitespace (``len(text)`` if none)."""
    return _SPACES.match(text, position).end()


def count_answer_blocks(text: str, open_tag: str = "<answer>", close_tag: str = "</answer>", *,
                        stop_at: int | None = None) -> int:
    """How many blocks ``re.findall(open_tag + r"\\s*(\\S.*?)\\s*" + close_tag, re.DOTALL)`` finds: blocks holding
    something besides whitespace (counting stops at ``stop_at``).

    Such a block starts at the first non-space character after its opener and ends at the first closer after
    that character, so a block with only spaces before its closer reaches on to the next closer, as the regex
    does.
    """
    count, position = 0, 0
    while stop_at is None or count < stop_at:
        opener = text.find(open_tag, position)
        if opener < 0:
            break
        first = skip_spaces(text, opener + len(open_tag))
        closer = text.find(close_tag, first + 1) if first < len(text) else -1
        if closer < 0:
            break  # every later opener has its first non-space at or after this one's: none can close either
        count += 1
        position = closer + len(close_tag)
    return count


def is_reasoning_then_answer(text: str) -> bool:
    """Whether ``text`` matches ``^\\s*<reasoning>.*?</reasoning>\\s*<answer>\\s*\\S.*?</answer>\\s*$`` (DOTALL),
    decided in linear time.

    The text must begin (after whitespace) with ``<reasoning>`` and end with its last ``</answer>`` (then only
    whitespace). The reasoning may end at ANY ``</reasoning>`` followed by whitespace, ``<answer>``, whitespace
    and a non-space character; the leftmost such tag has the leftmost non-space character, so it is the only
    one to try: it works if that character comes before the final closer.
    """
    start = skip_spaces(text, 0)
    if not text.startswith("<reasoning>", start):
        return False
    final = text.rfind("</answer>")
    if final < 0 or skip_spaces(text, final + len("</answer>")) != len(text):
        return False
    answer = _REASONING_THEN_ANSWER.search(text, start + len("<reasoning>"))
    return answer is not None and answer.end() - 1 < final


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces matched; None if unclosed.

    One pass over the runs of braces after the last ``\\boxed`` (a run of ``{`` or of ``}`` at a time, so deep
    nesting costs two steps): linear in the text's length.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    open_brace = text.find("{", start)
    if open_brace < 0:
        return None
    depth = 0
    for run in _BRACE_RUNS.finditer(text, open_brace):
        size = run.end() - run.start()
        if text[run.start()] == "{":
            depth += size
        elif size >= depth:  # the depth-th brace of this run closes the box
            return text[open_brace + 1:run.start() + depth - 1]
        else:
            depth -= size
    return None


def last_gsm8k_marker(text: str) -> str | None:
    """The rest of the line after the last ``####`` marker (GSM8K's answer convention), or None."""
    last = None
    for match in _GSM8K_MARKER.finditer(text):
        last = match
    return None if last is None else last.group(1)


def last_number(text: str) -> str | None:
    """The last number in the text (``-1,080.5`` style), or None."""
    last = None
    for match in _NUMBER.finditer(text):
        last = match
    return None if last is None else last.group()


def first_ascii_digits(text: str, count: int) -> str:
    """The first ``count`` ASCII digits of the text, in order (fewer if it has fewer)."""
    return "".join(match.group() for match in itertools.islice(_ASCII_DIGIT.finditer(text), count))
