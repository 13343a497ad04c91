"""Math answer rewards: extract the final answer from a completion (in linear time, see
:mod:`dare_gym.rewards.extract`), check its form, and judge it against the gold with math-verify, under a time
limit this module owns (see :mod:`dare_gym.rewards.worker`).

math-verify is lenient by design: it reads ``19 = 18`` as its right-hand side, drops ``\\text{...}`` and
``\\%``, and lets a set, an interval or a tuple stand for one another. That is right for grading a careful
writer, wrong for a reward a policy can optimise against: a hedge that states two values, or an equation whose
sides disagree, would score. So before math-verify sees an answer, :func:`answer_form_problem` names what is
wrong with its form (the gold decides what is allowed: a gold that is itself an equation, a set, a percentage or
an interval lets the answer be one too):

* an equation counts only when its last side is the answer and every other side is the answer too or a name
  (``x = 18``, ``f(3) = 18``; not ``19 = 18``, ``17 + 2 = 18``, ``18 = x``); so does a chain of ``==``, ``:=``,
  ``\\approx``, ``\\equiv``, ``\\to`` or ``\\Rightarrow``, which math-verify also reads as its last side;
* a hedge is wrong: text that holds a number (``18 \\text{ (or maybe 19)}``), words such as "or" or "maybe",
  two values side by side;
* a percentage, a set or an interval where the gold is a plain value or a point is wrong (``18\\%``,
  ``\\{18\\}``, ``[3, \\frac{\\pi}{2}]`` for the point ``(3, \\frac{\\pi}{2})``);
* an expression whose value is too big to compute (a power tower, a huge power or factorial, an integral, sum,
  product or limit the gold does not have) is wrong without sympy ever seeing it: sympy's big integers are C
  code that no alarm interrupts (``9^{9^{9}}`` took a minute and ``2^{10^{9}}`` 0.7 GB).

Then units and other words around a value are dropped (``18 dollars``, ``18 \\text{ eggs}``) and scientific
notation is read as a number (``1.8e1``).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Mapping

from dare_gym.rewards.base import register_reward
from dare_gym.rewards.extract import last_boxed, last_gsm8k_marker, last_number, last_tag_block
from dare_gym.rewards.worker import RewardTimeout, alarm, in_helper, run_with_timeout

VERIFY_TIMEOUT_S = 5.0
MAX_ANSWER_CHARS = 1000  # a longer final answer is judged wrong without parsing it (MATH-500's golds: <= 53)
MAX_RESULT_DIGITS = 10_000  # a power of numbers with more digits than this is not computed
MAX_SYMBOLIC_EXPONENT = 1_000  # nor a power of an expression with a larger exponent
MAX_FACTORIAL = 5_000  # nor the factorial of a larger number (MATH has an answer with 2004!)
MAX_BINOMIAL = 100_000  # nor a binomial coefficient of larger numbers
_CACHED_CHARS = 1000  # pairs longer than this are not kept in the verdict cache

__all__ = ["answer_form_problem", "answers_match", "extract_final_answer", "gold_answer", "gsm8k_gold", "last_boxed",
           "math_verify_reward"]


def extract_final_answer(text: str) -> str | None:
    """The completion's final answer, by the first convention that matches: the last ``<answer>`` block
    (and a ``\\boxed`` inside it), else the last ``\\boxed{}``, else GSM8K's ``#### x`` line, else the last
    number in the text. Linear in the text's length."""
    tagged = last_tag_block(text, "<answer>", "</answer>", ignore_case=True)
    if tagged is not None:
        inner = tagged.strip()
        return last_boxed(inner) or inner
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    marker = last_gsm8k_marker(text)
    if marker is not None:
        return marker.strip()
    return last_number(text)


_GSM8K_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


def gsm8k_gold(answer_field: str) -> str:
    """GSM8K's gold number: the text after the final ``####``, thousands separators removed. Anything else
    after the marker (nothing, a word) is an error: a gold that is not a number would make every answer wrong."""
    marker = last_gsm8k_marker(answer_field)
    if marker is None:
        raise ValueError(f"a GSM8K answer must end with '#### <number>', got ...{answer_field[-60:]!r}")
    gold = marker.replace(",", "").strip()
    if not _GSM8K_NUMBER.fullmatch(gold):
        raise ValueError(f"a GSM8K answer must end with '#### <number>', got '#### {marker.strip()[:60]}'")
    return gold


def _strip_number_commas(answer: str) -> str:
    # "1,080" is a thousands separator, not a tuple; math-verify would read it as (1, 80). LaTeX writes one as
    # "1{,}080", "1,\!080" or with a thin space, "1\,080" (which would read as two values side by side).
    return re.sub(r"(?<=\d)(?:\{,\}|,\\!|,|\\,)(?=\d{3}\b)", "", answer)


@functools.lru_cache(maxsize=4096)
def _parse(text: str):
    """math-verify's parse, cached in the helper process: a GRPO group shares one gold, parsed once."""
    from math_verify import parse

    return parse(f"${text}$", parsing_timeout=None)


def _verify_in_process(gold: str, prediction: str) -> bool:
    """math-verify with its signal-based timeouts disabled: the caller enforces the limit."""
    from math_verify import verify

    gold_parsed, pred_parsed = _parse(gold), _parse(prediction)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _import_math_verify() -> None:
    """Import math-verify and sympy (about a second) before a helper's first call, outside its time limit."""
    import math_verify  # noqa: F401

    _parse("1")


def _verify(gold: str, prediction: str, timeout: float) -> bool:
    """math-verify under a hard limit: in a helper process already (the reward runs there under its term's
    limit), an alarm stops sympy after ``timeout``; elsewhere the check is sent to a helper that is killed."""
    try:
        if in_helper():
            with alarm(timeout):
                return _verify_in_process(gold, prediction)
        return bool(run_with_timeout(_verify_in_process, gold, prediction, timeout=timeout))
    except RewardTimeout:
        return False


_verify_cached = functools.lru_cache(maxsize=65536)(_verify)


def answers_match(gold: str, prediction: str, timeout: float = VERIFY_TIMEOUT_S, shortcut: bool = True) -> bool:
    """Whether ``prediction`` is mathematically equal to ``gold``. Identical strings short-cut (``shortcut=False``
    sends them to math-verify too, for benchmarks); an answer longer than ``MAX_ANSWER_CHARS`` or whose form is
    wrong (:func:`answer_form_problem`) is not equal; an equation is judged side by side; anything else is
    verified by math-verify under a hard limit of ``timeout`` seconds (then: not equal). Verdicts on short pairs
    are cached."""
    gold, prediction = _strip_number_commas(gold.strip()), _strip_number_commas(prediction.strip())
    if not prediction or len(prediction) > MAX_ANSWER_CHARS:
        return False
    return _matches(gold, _unwrapped(prediction), timeout, shortcut)


def _unwrapped(answer: str) -> str:
    """The answer inside a ``\\boxed{}`` (or outer braces) that wraps all of it: ``\\boxed{19 = 18}`` is the
    equation ``19 = 18``, which math-verify would read as its right-hand side."""
    while True:
        command = re.match(r"\\(?:boxed|fbox)\s*(?=\{)", answer)
        brace = command.end() if command else 0
        if answer[brace:brace + 1] == "{" and _closing(answer, brace) == len(answer) - 1:
            answer = answer[brace + 1:-1].strip()
        else:
            return answer


def _closing(text: str, start: int) -> int:
    """Where the bracket opened at ``start`` closes (-1 if it does not)."""
    depth = 0
    for position in range(start, len(text)):
        depth += text[position] in "([{"
        depth -= text[position] in ")]}"
        if depth == 0:
            return position
    return -1


def _matches(gold: str, prediction: str, timeout: float, shortcut: bool) -> bool:
    if shortcut and prediction == gold:
        return True
    if answer_form_problem(gold, prediction) is not None:
        return False
    prediction = _plain_value(gold, prediction)
    sides = _equation_sides(gold, prediction)
    if sides is not None:  # every side but names must be the answer: a wrong side is a wrong answer
        *names, value = sides
        return (not _is_name(value) and _matches(gold, value, timeout, shortcut)
                and all(_is_name(side) or _matches(gold, side, timeout, shortcut) for side in names))
    if not prediction or (shortcut and prediction == gold):
        return bool(prediction)
    if len(gold) + len(prediction) <= _CACHED_CHARS:
        return _verify_cached(gold, prediction, timeout)
    return _verify(gold, prediction, timeout)


# ------------------------------------------------------------------------------------------ answer forms
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|textrm|mbox|mathrm|operatorname)\s*\{([^{}]*)\}")
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}(?![A-Za-z])")
_UNIT_POWER = re.compile(r"\s*\^\s*(?:\{\s*[23]\s*\}|[23])")  # used with .match(text, position)
_HEDGES = frozenset({"or", "and", "maybe", "perhaps", "possibly", "probably", "likely", "either", "not", "nor",
                     "approximately", "about", "around", "roughly", "nearly", "almost", "unless", "except"})
_TWO_VALUES = re.compile(r"\d(?:\s|~|\\[ ,;:!]|\\q?quad(?![A-Za-z]))+[-+]?\.?\d")  # digits apart by spaces only
_PERCENT = re.compile(r"\\?%|\\percent\b")
_SET_BRACE = re.compile(r"\\\{|\\lbrace\b")
_SIZING = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])\s*")
_BIG_OPERATORS = re.compile(r"\\(?:int|iint|iiint|oint|sum|prod|coprod|lim|limsup|liminf)(?![A-Za-z])")
_SCIENTIFIC = re.compile(r"(?<![\w.\\])(\d+(?:\.\d+)?|\.\d+)[eE]([-+]?\d{1,4})(?![\w.])")
_NUMBER_TEXT = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_NAME = re.compile(r"\\?[A-Za-z]+'*(?:_\{?[A-Za-z0-9]+\}?)?(?:\s*\([^()=]*\))?")
_RELATION = re.compile(r"==|:=|=|≈|≡|→|⇒|⟹|\\(?:equiv|sim|simeq|approx|cong|to|rightarrow|Rightarrow|longrightarrow|"
                       r"Longrightarrow|implies|iff|Leftrightarrow|mapsto)(?![A-Za-z])")


def answer_form_problem(gold: str, prediction: str) -> str | None:
    """Why the form of ``prediction`` cannot be a right answer to ``gold``, or None (see the module docstring):
    a hedge, a percentage, a set or an interval the gold is not, or an expression too big to compute."""
    gold_words = _has_words(gold)
    for text in _TEXT_COMMAND.findall(prediction):
        if any(c.isdigit() for c in text) and not any(c.isdigit() for t in _TEXT_COMMAND.findall(gold) for c in t):
            return f"a hedge: text with a number in it ({text.strip()[:40]!r})"
    if not gold_words:
        hedges = sorted({w.lower() for w in _words(prediction)} & _HEDGES)
        if hedges:
            return f"a hedge: {', '.join(repr(h) for h in hedges)}"
        if _TWO_VALUES.search(_plain_value(gold, prediction)) and not _TWO_VALUES.search(gold):
            return "a hedge: two values side by side"
    if _PERCENT.search(prediction) and not _PERCENT.search(gold):
        return "a percentage where the answer is not one"
    if _SET_BRACE.search(prediction) and not _SET_BRACE.search(gold):
        return "a set where the answer is not one"
    gold_pair, pair = _delimited_pair(gold), _delimited_pair(prediction)
    if gold_pair is not None and pair is not None and gold_pair != pair:
        return f"{pair[0]}...{pair[1]} where the answer is {gold_pair[0]}...{gold_pair[1]} (an interval is not a point)"
    return _too_big(gold, prediction)


def _words(text: str) -> list[str]:
    """The words of ``text``: runs of two or more letters that are not LaTeX commands, and the words inside
    ``\\text{...}``-like commands."""
    inside = [w for t in _TEXT_COMMAND.findall(text) for w in re.findall(r"[A-Za-z]+", t)]
    return inside + _WORD.findall(_TEXT_COMMAND.sub(" ", text))


def _has_words(text: str) -> bool:
    return bool(_words(text))


def _plain_value(gold: str, prediction: str) -> str:
    """``prediction`` with scientific notation written as a power of ten, and, where the gold has no words,
    the words around the value dropped (units: ``18 dollars``, ``18 \\text{ cm}^2``)."""
    prediction = _SCIENTIFIC.sub(lambda m: f"{m.group(1)} \\times 10^{{{int(m.group(2))}}}", prediction)
    if _has_words(gold):
        return prediction
    pieces, position = [], 0
    for match in re.finditer(f"{_TEXT_COMMAND.pattern}|{_WORD.pattern}", prediction):
        command = match.group(0).startswith("\\")
        if command and not re.search(r"[A-Za-z]{2,}", match.group(1) or ""):
            continue  # \mathrm{e}, \text{ }: not a word
        pieces.append(prediction[position:match.start()])
        position = match.end()
        power = _UNIT_POWER.match(prediction, position)  # cm^2: the power belongs to the unit
        if power is not None:
            position = power.end()
    return ("".join(pieces) + prediction[position:]).strip()


def _delimited_pair(text: str) -> tuple[str, str] | None:
    """The outer delimiters of a tuple or an interval (``("(", "]")`` for ``(a, b]``), or None if ``text`` is not
    one bracketed group with a comma at its top level."""
    text = _SIZING.sub("", text).replace("\\lbrack", "[").replace("\\rbrack", "]").strip()
    if len(text) < 3 or text[0] not in "([" or text[-1] not in ")]":
        return None
    depth, comma = 0, False
    for position, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth == 0 and position != len(text) - 1:
                return None  # the first group closes before the end: not one group
        elif char == "," and depth == 1:
            comma = True
    return (text[0], text[-1]) if comma and depth == 0 else None


def _equation_sides(gold: str, prediction: str) -> list[str] | None:
    """The sides of an equation (or of a chain of ``=``, ``==``, ``:=``, ``\\approx``, ``\\equiv``, ``\\to``,
    ``\\Rightarrow``... which math-verify all reads as their last side), split where they stand outside brackets;
    None if ``prediction`` is not one, or if the gold has such a sign itself (then math-verify compares the
    two), or for an inequality (math-verify's call)."""
    if _RELATION.search(gold) or not _RELATION.search(prediction):
        return None
    depth, depths = 0, []
    for char in prediction:
        depths.append(depth)
        depth += char in "([{"
        depth -= char in ")]}"
    sides, start = [], 0
    for match in _RELATION.finditer(prediction):
        if depths[match.start()] != 0:
            continue
        if match.group() == "=" and prediction[match.start() - 1:match.start()] in ("<", ">", "!"):
            return None  # <=, >=, != : an inequality
        sides.append(prediction[start:match.start()].strip())
        start = match.end()
    sides.append(prediction[start:].strip())
    return sides if len(sides) > 1 else None


def _is_name(side: str) -> bool:
    """Whether an equation's side names what the answer is (``x``, ``a_n``, ``f(3)``, ``AB``) rather than
    stating a value: no digit, or one name applied to arguments."""
    return bool(side) and (not any(c.isdigit() for c in side) or _NAME.fullmatch(side.strip()) is not None)


# --------------------------------------------------------------------------------- expressions too big
def _too_big(gold: str, prediction: str) -> str | None:
    """Why computing ``prediction`` could take sympy more than seconds or gigabytes, or None: a bound on the
    digits of every power and factorial of numbers, read off the text before any parser sees it."""
    extra = set(_BIG_OPERATORS.findall(prediction)) - set(_BIG_OPERATORS.findall(gold))
    if extra:
        return f"not a closed form: {', '.join(sorted(extra))}"
    for position, char in enumerate(prediction):
        if char == "^":
            base = _operand_before(prediction, position)
            exponent, end = _operand_after(prediction, position + 1)
            if prediction[end:].lstrip().startswith("^") and _is_numeric(exponent):
                return "a power tower too big to compute (a^b^c)"  # read as a^(b^c)
            problem = _power_problem(base, exponent)
        elif char == "!" and prediction[position + 1:position + 2] != "=":
            problem = _factorial_problem(_operand_before(prediction, position))
        else:
            continue
        if problem is not None:
            return problem
    for binomial in re.finditer(r"\\[dt]?binom(?![A-Za-z])", prediction):
        first, end = _operand_after(prediction, binomial.end())
        second, _ = _operand_after(prediction, end)
        for argument in (first, second):
            literal = argument.strip().strip("{}").strip()
            if _is_numeric(argument) and not (literal.isdigit() and int(literal) <= MAX_BINOMIAL):
                return f"a binomial coefficient too big to compute (\\binom{{{literal[:20]}}})"
    return None


def _power_problem(base: str, exponent: str) -> str | None:
    if _is_numeric(exponent) and ("^" in exponent or "!" in exponent):
        return f"a power tower too big to compute (^{{{exponent[:20]}}})"
    if not _is_numeric(exponent):
        return None  # a symbolic exponent (e^{x^2}): sympy keeps it as it is
    size = _numeric_bound(exponent)
    if _is_numeric(base) and "^" not in base:
        digits = size * max(1.0, math.log10(max(_numeric_bound(base), 1.0)))
        if digits > MAX_RESULT_DIGITS:
            return f"a power too big to compute (about {digits:.3g} digits)"
    elif size > MAX_SYMBOLIC_EXPONENT:
        return f"an exponent too big to expand ({size:.3g})"
    return None


def _factorial_problem(operand: str) -> str | None:
    if not _is_numeric(operand):
        return None  # n!: symbolic
    literal = operand.strip().strip("{}()").strip()
    if not literal.isdigit() or int(literal) > MAX_FACTORIAL:
        return f"a factorial too big to compute ({operand[:20]}!)"
    return None


def _is_numeric(text: str) -> bool:
    """Whether ``text`` is made of numbers and arithmetic only (no variable, constant or function)."""
    stripped = re.sub(r"\\(?:frac|dfrac|tfrac|cdot|times|div|left|right|sqrt)(?![A-Za-z])", " ", text)
    return not re.search(r"[A-Za-z\\]", stripped) and any(c.isdigit() for c in stripped)


def _numeric_bound(text: str) -> float:
    """An upper bound of the absolute value of a numeric expression without powers or factorials: the
    product of (1 + each number's absolute value) bounds any sum, difference, product or quotient of them."""
    bound = 1.0
    for number in _NUMBER_TEXT.findall(text):
        try:
            bound *= 1.0 + abs(float(number))
        except (ValueError, OverflowError):
            return math.inf
    return bound


def _operand_before(text: str, end: int) -> str:
    """The operand that ends just before ``end``: a bracketed group, a number, or a name."""
    position = end - 1
    while position >= 0 and text[position].isspace():
        position -= 1
    if position < 0:
        return ""
    if text[position] in ")]}":
        depth, start = 0, position
        while start >= 0:
            depth += text[start] in ")]}"
            depth -= text[start] in "([{"
            if depth == 0:
                break
            start -= 1
        return text[max(start, 0):position + 1]
    start = position
    while start > 0 and (text[start - 1].isdigit() or text[start - 1] == "."):
        start -= 1
    if text[position].isdigit() or text[position] == ".":
        return text[start:position + 1]
    return text[position]


def _operand_after(text: str, start: int) -> tuple[str, int]:
    """The operand that starts at ``start`` (after spaces): a braced group, a number, a command or one
    character; and where it ends."""
    while start < len(text) and text[start].isspace():
        start += 1
    if start >= len(text):
        return "", start
    if text[start] == "{":
        end = _closing(text, start)
        end = len(text) - 1 if end < 0 else end
        return text[start:end + 1], end + 1
    match = re.compile(r"[-+]?\d[\d.]*|\\[A-Za-z]+|.", re.DOTALL).match(text, start)
    return match.group(0), match.end()


answers_match.cache_clear = _verify_cached.cache_clear  # benchmarks time uncached verification


def gold_answer(sample: Mapping) -> str:
    """The record's gold final answer: ``gold`` if the env set it, else derived from ``answer``."""
    if "gold" in sample:
        return str(sample["gold"])
    if "answer" in sample:
        answer = str(sample["answer"])
        return gsm8k_gold(answer) if "####" in answer else answer
    raise KeyError("the sample has neither a 'gold' nor an 'answer' field")


@register_reward("math_verify")
def math_verify_reward(completion: str, sample: Mapping) -> float:
    """1.0 if the completion's final answer equals the gold answer under math-verify, else 0.0."""
    prediction = extract_final_answer(completion)
    if prediction is None:
        return 0.0
    return 1.0 if answers_match(gold_answer(sample), prediction) else 0.0


# Loaded once per helper process before its first call, so that no call's limit pays for the import.
_verify_in_process.warm_up = _import_math_verify
math_verify_reward.warm_up = _import_math_verify
