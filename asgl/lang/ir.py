"""The expressions a program appends to its state with `s += ...`.

`"Q: " + gen("a") + "\\n"` builds a `Concat`; `flatten` turns any expression into the flat list
of operations the executor runs in order: text, `Gen`, `Select`, `Image`, `RoleBegin`,
`RoleEnd`. Nothing here talks to a backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from asgl.lang.images import ImageData

# SGLang's regexes for typed generation (`gen(dtype=int)`, `gen_int`, `gen_string`); its
# programs import them from here. The trailing `[ \n]*` lets a number end with the space or
# newline that `dtype` adds as a stop string.
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
REGEX_STR = r"\"[\w\d\s]*\""  # a quoted string of word characters and spaces


class Expr:
    """Base of every primitive: `+` with text or other expressions concatenates."""

    def __add__(self, other: Any) -> "Concat":
        return Concat.of(self, other)

    def __radd__(self, other: Any) -> "Concat":
        return Concat.of(other, self)


@dataclass(eq=False)
class Concat(Expr):
    parts: list = field(default_factory=list)  # str | Expr, never a nested Concat

    @staticmethod
    def of(*items: Any) -> "Concat":
        parts: list = []
        for item in items:
            if isinstance(item, Concat):
                parts.extend(item.parts)
            elif isinstance(item, (str, Expr)):
                parts.append(item)
            else:
                raise TypeError(f"cannot add a {type(item).__name__} to a program state: "
                                "use text (str) or gen/select/image/role expressions")
        return Concat(parts)


@dataclass(eq=False)
class Gen(Expr):
    """Generate text; stored in the state under `name` (when given)."""
    name: Optional[str]
    params: dict  # only the sampling parameters given explicitly (see sampling.py)
    dtype: Optional[str] = None  # "int" | "float" | "str" | "bool": typed generation


@dataclass(eq=False)
class Select(Expr):
    """Pick one of `choices`; stored under `name`."""
    name: Optional[str]
    choices: list[str]
    temperature: float = 0.0
    choices_method: Any = None  # a choices.ChoicesMethod; None: token_length_normalized


@dataclass(eq=False)
class Image(Expr):
    data: ImageData


@dataclass(eq=False)
class RoleBegin(Expr):
    role: str


@dataclass(eq=False)
class RoleEnd(Expr):
    role: str


@dataclass(eq=False)
class VarScopeBegin(Expr):
    """`with s.var_scope(name)`: everything written until the matching end becomes `s[name]`."""
    name: str


@dataclass(eq=False)
class VarScopeEnd(Expr):
    name: str


Op = Union[str, Gen, Select, Image, RoleBegin, RoleEnd, VarScopeBegin, VarScopeEnd]


def role(name: str, expr: Any = None) -> Concat:
    """`user("hi")`: the role's opening, its content, and its closing."""
    return Concat.of(RoleBegin(name), *([] if expr is None else [expr]), RoleEnd(name))


def flatten(expr: Any) -> list[Op]:
    if isinstance(expr, Concat):
        return [p for p in expr.parts if p != ""]
    if isinstance(expr, (str, Expr)):
        return [expr] if expr != "" else []
    return Concat.of(expr).parts  # raises the TypeError with its message
