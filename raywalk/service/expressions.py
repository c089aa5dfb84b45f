"""The sweep's expression language: a tiny arithmetic over a point's n, w and K, parsed with `ast` (never eval).

Integers and decimals, the names n (graph.n), w and K (graph.K) of the point, + - * //, unary
minus, parentheses, and max(...)/min(...). A sweep file's `derived` values are such expressions.
"""
from __future__ import annotations

import ast
import operator
from typing import Any, Mapping

from raywalk.config import ConfigError

EXPR_NAMES = ("n", "w", "K")
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}
_FUNCS = {"max": max, "min": min}


class Expr:
    """A parsed, checked expression; `eval_with(names)` computes it."""

    def __init__(self, text: str, where: str):
        self.text, self.where = text, where
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{where}: {text!r} is invalid: an expression must be a non-empty string")
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError:
            raise ConfigError(f"{where}: {text!r} is invalid: not an arithmetic expression") from None
        self._check(tree.body)
        self.tree = tree.body

    def _bad(self, what: str) -> None:
        raise ConfigError(f"{self.where}: {self.text!r} is invalid: {what} (allowed: numbers, "
                          f"{', '.join(EXPR_NAMES)}, + - * //, parentheses, max(), min())")

    def _check(self, node: ast.AST) -> None:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                self._bad(f"constant {node.value!r} is not a number")
        elif isinstance(node, ast.Name):
            if node.id not in EXPR_NAMES:
                self._bad(f"unknown name {node.id!r}")
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BINOPS:
                self._bad(f"operator {type(node.op).__name__} is not allowed")
            self._check(node.left)
            self._check(node.right)
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.USub, ast.UAdd)):
                self._bad(f"operator {type(node.op).__name__} is not allowed")
            self._check(node.operand)
        elif isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _FUNCS) or node.keywords or not node.args:
                self._bad("only max(a, b, ...) and min(a, b, ...) may be called")
            for a in node.args:
                self._check(a)
        else:
            self._bad(f"{type(node).__name__} is not allowed")

    def eval_with(self, names: Mapping[str, Any]) -> int | float:
        def ev(node: ast.AST) -> Any:
            if isinstance(node, ast.Constant):
                return node.value
            if isinstance(node, ast.Name):
                return names[node.id]
            if isinstance(node, ast.BinOp):
                left, right = ev(node.left), ev(node.right)
                if isinstance(node.op, ast.FloorDiv) and right == 0:
                    raise ConfigError(f"{self.where}: {self.text!r} is invalid: division by zero at "
                                      f"{_fmt_names(names)}")
                return _BINOPS[type(node.op)](left, right)
            if isinstance(node, ast.UnaryOp):
                v = ev(node.operand)
                return -v if isinstance(node.op, ast.USub) else v
            assert isinstance(node, ast.Call)
            return _FUNCS[node.func.id](*(ev(a) for a in node.args))  # type: ignore[attr-defined]

        v = ev(self.tree)
        if isinstance(v, float) and v.is_integer():
            v = int(v)   # 0.5*n with an even n is an integer count
        return v


def evaluate(text: str, names: Mapping[str, Any], where: str = "expression") -> int | float:
    """Evaluate a sweep expression safely (no eval): numbers, n, w, K, + - * //, max, min."""
    return Expr(text, where).eval_with(names)


def _fmt_names(names: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in names.items())
