"""
The agent's tools: a safe calculator and a lookup over a knowledge base.

Every tool takes the text between its tags and returns a string, never raises:
a result, or "error: ..." that the policy reads as its observation. The policy
writes anything from its very first RL step, so these functions are the
boundary between untrusted model output and the environment.
"""
import ast
import bisect
import math
import os
from dataclasses import dataclass
from typing import Callable

MAX_EXPR_CHARS = 200      # longer expressions are refused before parsing
MAX_DEPTH = 32            # nesting depth of the expression tree
MAX_EXPONENT = 64         # |b| in a ** b
MAX_MAGNITUDE = 10 ** 15  # every literal and intermediate result must stay below this
ALLOWED_CHARS = set("0123456789+-*/%().eE ")


class CalcError(Exception):
    pass


def format_number(x):
    """Canonical text of a number: 5350 (never 5350.0), 0.25, 0.3333333333."""
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    if isinstance(x, int):
        return str(x)
    return f"{x:.10g}"


def _check(x):
    if isinstance(x, float) and not math.isfinite(x):
        raise CalcError("result is not a finite number")
    if abs(x) >= MAX_MAGNITUDE:
        raise CalcError("number too large")
    return x


def _power(base, exponent):
    if abs(exponent) > MAX_EXPONENT:
        raise CalcError(f"exponent larger than {MAX_EXPONENT}")
    if base == 0 and exponent < 0:
        raise CalcError("division by zero")
    result = base ** exponent
    if isinstance(result, complex):
        raise CalcError("result is not a real number")
    return result


_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: _power,
}
_UNARY = {ast.USub: lambda a: -a, ast.UAdd: lambda a: a}


def _evaluate(node, depth=0):
    """Walk the tree; anything not whitelisted here is refused."""
    if depth > MAX_DEPTH:
        raise CalcError("expression nested too deeply")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _check(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _check(_UNARY[type(node.op)](_evaluate(node.operand, depth + 1)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left = _evaluate(node.left, depth + 1)
        right = _evaluate(node.right, depth + 1)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise CalcError("division by zero")
        return _check(_BINARY[type(node.op)](left, right))
    raise CalcError(f"unsupported element {type(node).__name__}")


def calculator(expr):
    """Evaluate + - * / // % ** and parentheses over numbers, e.g. '5230+120' -> '5350'."""
    if not isinstance(expr, str):
        return "error: expression must be text"
    expr = expr.strip()
    if not expr:
        return "error: empty expression"
    if len(expr) > MAX_EXPR_CHARS:
        return f"error: expression longer than {MAX_EXPR_CHARS} characters"
    bad = sorted(set(expr) - ALLOWED_CHARS)
    if bad:
        return f"error: bad character {bad[0]!r}"
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "error: not a valid expression"
    try:
        return format_number(_evaluate(tree.body))
    except CalcError as e:
        return f"error: {e}"
    except (OverflowError, ZeroDivisionError, RecursionError, ValueError, TypeError):
        return "error: cannot compute that"


class Lookup:
    """Answers 'Entity.attribute' from kb = {entity: {attribute: value}}; case and spaces are
    forgiven. An unknown entity gets the alphabetically nearest name as a hint, an unknown
    attribute the list of attributes: short, since the environment cuts each observation."""

    def __init__(self, kb):
        self.kb = kb
        self.names = {name.lower(): name for name in kb}
        self.ordered = sorted(self.names)

    def __call__(self, key):
        if not isinstance(key, str) or key.count(".") != 1:
            return "error: write Entity.attribute"
        entity, attribute = (part.strip().lower() for part in key.split("."))
        if entity not in self.names:
            i = bisect.bisect_left(self.ordered, entity)  # the names on either side, in alphabetical order
            nearest = max(self.ordered[max(0, i - 1):i + 1], key=lambda name: len(os.path.commonprefix([name, entity])))
            return f"error: no entity; try {self.names[nearest]}"
        record = self.kb[self.names[entity]]
        if attribute not in record:
            return "error: attributes are " + ", ".join(record)
        return format_number(record[attribute])


# The registry: every tool is one entry of TOOLS, and adding a tool is adding an entry. The rest
# follows from it: the tags <name> and </name> (each one token), the tools named in a --model's
# prompt, the environment's dispatch, and how toy_tasks reads the calls a trajectory makes.


@dataclass(frozen=True)
class Tool:
    usage: str  # how the prompt describes a call, e.g. "<calc>expression</calc> does arithmetic"
    make: Callable  # the world's knowledge base -> the tool: argument text -> observation text


TOOLS = {
    "calc": Tool("<calc>expression</calc> does arithmetic", lambda kb: calculator),
    "lookup": Tool("<lookup>Entity.attribute</lookup> reads a fact", Lookup),
}


def registry(kb):
    """name -> the tool, ready to run in this world."""
    return {name: tool.make(kb) for name, tool in TOOLS.items()}


def run_tool(tools, name, argument):
    """The environment's single entry point: unknown tools are errors, not exceptions."""
    if name not in tools:
        return f"error: unknown tool {name!r}; tools are " + ", ".join(tools)
    if not argument.strip():
        return "error: empty tool call"
    return tools[name](argument)
