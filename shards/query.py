"""``--where`` expressions: a small, safe subset of Python turned into a pyarrow filter.

Examples::

    split == 'train' and has_ptx
    has_ptx == True and mask_area_px > 1000
    view_position in ['PA', 'AP'] and not (age_years < 18)
    has_ptx is None                      # unlabelled images
    'Pneumothorax' in findings           # list column membership (NIH)

The text is parsed with :mod:`ast` and only names, constants, comparisons, ``and``/``or``/
``not``, ``in`` and ``is [not] None`` are accepted: nothing is ever evaluated as code.
"""

from __future__ import annotations

import ast
import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pneumo.shards.errors import ManifestError

_COMPARE = {
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
}


_EXAMPLES = {
    "true/false": "write e.g. `has_ptx`, `not has_ptx` or `has_ptx == False`",
    "whole numbers": "write a number without quotes, e.g. `mask_area_px > 1000`",
    "numbers": "write a number without quotes, e.g. `age_years >= 18`",
    "text": "write quoted text, e.g. `split == 'train'`",
    "lists of text": "test membership, e.g. `'Pneumothorax' in findings`",
}


def _kind(arrow_type: pa.DataType) -> str:
    if pa.types.is_boolean(arrow_type):
        return "true/false"
    if pa.types.is_integer(arrow_type):
        return "whole numbers"
    if pa.types.is_floating(arrow_type):
        return "numbers"
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "text"
    if pa.types.is_list(arrow_type):
        return "lists of text"
    return str(arrow_type)


def parse_where(text: str, schema: pa.Schema) -> ds.Expression:
    """Turn ``text`` into a pyarrow dataset expression over ``schema``'s columns.

    Raises:
        ManifestError: the text is not a valid expression, or names an unknown column.
    """
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise ManifestError(f"--where {text!r} is not a valid expression: {e.msg}") from e
    return _Builder(text, schema).build(tree.body)


class _Builder:
    def __init__(self, text: str, schema: pa.Schema) -> None:
        self.text = text
        self.schema = schema

    def fail(self, why: str) -> ManifestError:
        return ManifestError(f"--where {self.text!r}: {why}")

    def build(self, node: ast.AST) -> ds.Expression:
        if isinstance(node, ast.BoolOp):
            parts = [self.build(v) for v in node.values]
            out = parts[0]
            for p in parts[1:]:
                out = (out & p) if isinstance(node.op, ast.And) else (out | p)
            return out
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~self.build(node.operand)
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.Name):  # a bare boolean column: `has_ptx`
            field = self.field(node)
            if not pa.types.is_boolean(self.schema.field(node.id).type):
                raise self.fail(f"column {node.id!r} is not boolean; compare it to a value")
            return field == True  # noqa: E712 - builds an expression
        raise self.fail(f"unsupported syntax {ast.unparse(node)!r}")

    def field(self, node: ast.AST) -> ds.Expression:
        if not isinstance(node, ast.Name):
            raise self.fail(f"expected a column name, got {ast.unparse(node)!r}")
        if node.id not in self.schema.names:
            known = ", ".join(self.schema.names)
            raise self.fail(f"unknown column {node.id!r} (columns: {known})")
        return ds.field(node.id)

    def value(self, node: ast.AST) -> Any:
        try:
            return ast.literal_eval(node)
        except (ValueError, SyntaxError) as e:
            raise self.fail(f"{ast.unparse(node)!r} is not a literal value") from e

    def check_type(self, column: str, value: Any) -> None:
        """A value must suit its column: pyarrow would fail later, with a page of traceback."""
        kind = _kind(self.schema.field(column).type)
        fits = {
            "true/false": isinstance(value, bool),
            "whole numbers": isinstance(value, int | float) and not isinstance(value, bool),
            "numbers": isinstance(value, int | float) and not isinstance(value, bool),
            "text": isinstance(value, str),
        }.get(kind, False)
        if not fits:
            raise self.fail(
                f"column {column!r} holds {kind} ({self.schema.field(column).type}), "
                f"so it cannot be compared with {value!r}; {_EXAMPLES.get(kind, '')}".rstrip("; ")
            )

    def compare(self, node: ast.Compare) -> ds.Expression:
        out: ds.Expression | None = None
        left = node.left
        for op, right in zip(node.ops, node.comparators, strict=True):
            part = self.compare_one(left, op, right)
            out = part if out is None else (out & part)
            left = right
        assert out is not None  # ast guarantees at least one comparator
        return out

    def compare_one(self, left: ast.AST, op: ast.cmpop, right: ast.AST) -> ds.Expression:
        if isinstance(op, ast.Is | ast.IsNot):
            if self.value(right) is not None:
                raise self.fail("`is` only compares with None")
            expr = self.field(left).is_null()
            return expr if isinstance(op, ast.Is) else ~expr
        if isinstance(op, ast.In | ast.NotIn):
            expr = self.membership(left, right)
            return expr if isinstance(op, ast.In) else ~expr
        fn = _COMPARE.get(type(op))
        if fn is None:
            raise self.fail(f"unsupported operator {type(op).__name__}")
        name, literal = (left, right) if isinstance(left, ast.Name) else (right, left)
        field = self.field(name)  # `mask_area_px > 1000` or `1000 < mask_area_px`
        value = self.value(literal)
        if value is None:
            raise self.fail("compare with None using `is None` / `is not None`")
        self.check_type(name.id, value)  # type: ignore[attr-defined]
        return fn(field, value) if name is left else fn(value, field)

    def membership(self, left: ast.AST, right: ast.AST) -> ds.Expression:
        if isinstance(left, ast.Name):  # column in [values]
            values = self.value(right)
            if not isinstance(values, list | tuple | set):
                raise self.fail("`in` needs a list of values on its right")
            field = self.field(left)
            for value in values:
                self.check_type(left.id, value)
            return field.isin(list(values))
        # 'value' in list_column
        column = self.field(right)
        value = self.value(left)
        if not pa.types.is_list(self.schema.field(right.id).type):  # type: ignore[attr-defined]
            raise self.fail(f"{right.id!r} is not a list column")  # type: ignore[attr-defined]
        if not isinstance(value, str):
            raise self.fail(f"{right.id!r} is a list of text, but {value!r} is not text")  # type: ignore[attr-defined]
        # pyarrow has no list-contains kernel: join the list and match the whole element.
        pattern = r"(^|\|)" + re.escape(str(value)) + r"($|\|)"
        return pc.match_substring_regex(pc.binary_join(column, "|"), pattern)
