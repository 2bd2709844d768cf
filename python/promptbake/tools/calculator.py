"""CALC: the value of an arithmetic expression, by a walk over its syntax tree (never ``eval``).

Numbers, ``+ - * / // %``, powers (``**``, or ``^`` as people write it), unary signs,
parentheses, ``×`` and ``÷``, and the functions ``sqrt``, ``abs`` and ``round``. Anything else
(names, attributes, calls of other functions, strings, comparisons) is refused. The work is
bounded: at most ``MAX_LENGTH`` characters, powers whose result would pass ``MAX_MAGNITUDE``
are refused before they are computed, and so is any intermediate result beyond it.
"""

from __future__ import annotations

import ast
import math
import operator
import re

from promptbake.tools.registry import ToolError

MAX_LENGTH = 200
MAX_MAGNITUDE = 1e100
_DIGITS = 10  # significant digits of a non-integer result

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: None}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": (1,), "abs": (1,), "round": (1, 2)}  # allowed numbers of arguments


def calculate(expression: str) -> str:
    """The value of ``expression`` as text (integers exactly, other values to 10 significant
    digits); raises ToolError with the reason for anything it refuses."""
    if not isinstance(expression, str) or not expression.strip():
        raise ToolError("give an arithmetic expression, such as 17 * 23")
    if len(expression) > MAX_LENGTH:
        raise ToolError(f"the expression is {len(expression)} characters long; the limit is "
                        f"{MAX_LENGTH}")
    text = expression.strip().replace("×", "*").replace("÷", "/").replace("^", "**")
    if re.search(r"\d,\d{3}(?!\d)", text):
        raise ToolError(f"cannot read {expression!r}: write numbers without thousands "
                        f"separators")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as err:
        raise ToolError(f"cannot read {expression!r} as an arithmetic expression") from err
    return format_number(_value(tree.body))


def format_number(value: float) -> str:
    """``value`` as a person writes it: integers (and floats that are whole) without a decimal
    point, other numbers to 10 significant digits, no exponent below 1e16."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        value = int(value)
    if isinstance(value, int):
        return str(value)
    text = f"{value:.{_DIGITS}g}"
    if "e" in text and 1e-5 <= abs(value) < 1e16:
        text = f"{value:.{_DIGITS}f}".rstrip("0").rstrip(".")
    return text


def _value(node) -> int | float:
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):
            raise ToolError(f"{node.value!r} is not a number")
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ToolError("division by zero")
        return _bounded(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
            node.func.id in _FUNCTIONS and not node.keywords:
        return _function(node.func.id, [_value(a) for a in node.args])
    raise ToolError(f"{ast.unparse(node)!r} is not arithmetic: use numbers, + - * / // % ^, "
                    f"parentheses, sqrt, abs and round")


def _power(base, exponent):
    if base == 0 and exponent < 0:
        raise ToolError("division by zero (0 to a negative power)")
    if base < 0 and not float(exponent).is_integer():
        raise ToolError("a negative number to a fractional power is not a real number")
    if abs(base) > 1 and exponent * math.log10(abs(base)) > math.log10(MAX_MAGNITUDE):
        raise ToolError(f"{base} ** {exponent} is larger than {MAX_MAGNITUDE:g}")
    if 0 < abs(base) < 1 and exponent < 0 and \
            -exponent * -math.log10(abs(base)) > math.log10(MAX_MAGNITUDE):
        raise ToolError(f"{base} ** {exponent} is larger than {MAX_MAGNITUDE:g}")
    return _bounded(base ** exponent)


def _function(name: str, args: list):
    if len(args) not in _FUNCTIONS[name]:
        counts = " or ".join(map(str, _FUNCTIONS[name]))
        raise ToolError(f"{name} takes {counts} argument(s), got {len(args)}")
    if name == "sqrt":
        if args[0] < 0:
            raise ToolError("the square root of a negative number is not a real number")
        return _bounded(math.sqrt(args[0]))
    if name == "abs":
        return abs(args[0])
    if len(args) == 2 and (not float(args[1]).is_integer() or abs(args[1]) > 20):
        raise ToolError("round's second argument is a number of digits between -20 and 20")
    return round(args[0], int(args[1])) if len(args) == 2 else round(args[0])


def _bounded(value):
    if isinstance(value, complex) or (isinstance(value, float) and not math.isfinite(value)) \
            or abs(value) > MAX_MAGNITUDE:
        raise ToolError(f"a result is larger than {MAX_MAGNITUDE:g} (or not a real number)")
    return value
