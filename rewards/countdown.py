"""The Countdown reward: an arithmetic expression over exactly the given numbers that hits the target.

The expression is the content of the last ``<answer>…</answer>`` (an ``= target`` tail is tolerated). It is
parsed with :mod:`ast` and evaluated by walking the tree with exact fractions: only numbers, ``+ - * /``,
unary minus and parentheses are allowed, so nothing in a completion is ever executed. The numbers used must
be exactly the multiset given (each once). Linear time: the block is found with a linear scan, and an
expression longer than 200 characters, or with a character no arithmetic expression has, is rejected before
it is parsed (so no string literal ever reaches the parser, and no parser warning reaches the console).
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from fractions import Fraction
from typing import Mapping

from dare_gym.rewards.base import register_reward
from dare_gym.rewards.extract import last_tag_block

_MAX_EXPRESSION_CHARS = 200
_NOT_ARITHMETIC = re.compile(r"[^0-9_\s+\-*/()×÷]")  # digits, spaces, operators, parentheses
_OPERATORS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
              ast.Div: lambda a, b: a / b}


class InvalidExpression(ValueError):
    pass


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        if isinstance(node.op, ast.Div) and right == 0:
            raise InvalidExpression("division by zero")
        return _OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand, used)
        return -value if isinstance(node.op, ast.USub) else value
    raise InvalidExpression(f"{type(node).__name__} is not allowed (only integers, + - * / and parentheses)")


def evaluate_expression(expression: str) -> tuple[Fraction, list[int]]:
    """The exact value of an arithmetic expression and the integers it uses, without executing anything."""
    expression = expression.strip()
    if "=" in expression:  # "(1 + 2) * 3 = 9": judge the left-hand side
        expression = expression.split("=", 1)[0]
    if len(expression) > _MAX_EXPRESSION_CHARS:
        raise InvalidExpression(f"expression longer than {_MAX_EXPRESSION_CHARS} characters")
    if "**" in expression:
        raise InvalidExpression("** is not allowed")
    stray = _NOT_ARITHMETIC.search(expression)
    if stray:
        raise InvalidExpression(f"{stray.group()!r} is not allowed (only integers, + - * / and parentheses)")
    try:
        tree = ast.parse(expression.replace("×", "*").replace("÷", "/"), mode="eval")
    except (SyntaxError, ValueError) as error:
        raise InvalidExpression(f"not an arithmetic expression: {error}") from None
    used: list[int] = []
    return _evaluate(tree, used), used


def countdown_solves(expression: str, numbers: list[int], target: int) -> bool:
    try:
        value, used = evaluate_expression(expression)
    except (InvalidExpression, RecursionError, MemoryError):
        return False
    return Counter(used) == Counter(numbers) and value == target


@register_reward("countdown", linear_time=True)
def countdown_reward(completion: str, sample: Mapping) -> float:
    """1.0 if the last ``<answer>`` expression uses exactly ``sample["numbers"]`` and equals ``sample["target"]``."""
    answer = last_tag_block(completion)
    if answer is None:
        return 0.0
    return 1.0 if countdown_solves(answer, list(sample["numbers"]), int(sample["target"])) else 0.0
