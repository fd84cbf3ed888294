"""Hypothesis strategies for constrained decoding tests: bounded JSON schemas and regexes.

Every schema and regex drawn here admits only outputs of bounded length (strings have a
maxLength or a bounded pattern, arrays a maxItems, numbers bounds), so a model that is
forced through them can always finish within a modest token budget.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
from hypothesis import strategies as st

_KEYS = ["id", "name", "age", "tags", "city", "score", "ok", "kind", "items", "note"]
_PATTERNS = [r"^[a-z]{1,8}$", r"^\d{3}-\d{4}$", r"^(red|green|blue)$", r"^[A-Z][a-z]{0,6}$",
             r"^[a-f0-9]{4}$", r"^x?y{1,3}$"]
_scalars = (st.integers(-50, 50) | st.sampled_from(["a", "b c", "Zed", "", "q\"t"])
            | st.booleans() | st.none())


def _bounds(lo: int, hi: int):
    return st.tuples(st.integers(lo, hi), st.integers(lo, hi)).map(sorted)


_integer = _bounds(-1000, 1000).map(lambda b: {"type": "integer", "minimum": b[0],
                                               "maximum": b[1]})
_number = st.tuples(_bounds(-100, 100), st.booleans()).map(
    lambda a: {"type": "number", "minimum": a[0][0] / 4, "maximum": a[0][1] / 4 + 1}
    if not a[1] else {"type": "number", "exclusiveMinimum": a[0][0],
                      "exclusiveMaximum": a[0][1] + 2})
_string = _bounds(0, 12).map(lambda b: {"type": "string", "minLength": b[0],
                                        "maxLength": max(b[1], 1)})
_pattern = st.sampled_from(_PATTERNS).map(lambda p: {"type": "string", "pattern": p})
_enum = st.lists(_scalars, min_size=1, max_size=4, unique_by=json.dumps).map(
    lambda v: {"enum": v})
_const = _scalars.map(lambda v: {"const": v})
_leaf = st.one_of(_integer, _number, _string, _pattern, _enum, _const,
                  st.just({"type": "boolean"}), st.just({"type": "null"}),
                  st.just({"type": ["integer", "null"], "minimum": 0, "maximum": 9}))


def _composite(inner):
    array = st.tuples(inner, _bounds(0, 3)).map(
        lambda a: {"type": "array", "items": a[0], "minItems": a[1][0], "maxItems": a[1][1]})
    obj = st.dictionaries(st.sampled_from(_KEYS), inner, min_size=1, max_size=4).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda req: {"type": "object", "properties": props, "required": req}))
    any_of = st.lists(inner, min_size=2, max_size=2).map(lambda s: {"anyOf": s})
    return st.one_of(array, obj, any_of)


def json_schemas(max_leaves: int = 6):
    """Objects at the top (what response_format users send), nesting up to a few leaves."""
    tree = st.recursive(_leaf, _composite, max_leaves=max_leaves)
    return st.dictionaries(st.sampled_from(_KEYS), tree, min_size=1, max_size=4).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda req: {"type": "object", "properties": props, "required": req}))


# --------------------------------------------------------------------------- regexes

_atoms = st.sampled_from([r"[a-z]", r"[A-Z]", r"\d", r"[0-9a-f]", r"x", r"ab", r"\.",
                          r"-", r" ", r"[^\n,]", r".", r"(cat|dog|bird)", r"\w", r"[,;]"])


def _piece(atom):
    return st.tuples(atom, st.sampled_from(["", "?", "{1,3}", "{2}", "{0,4}"])).map(
        lambda t: t[0] + t[1] if t[1] == "" or t[0].endswith((")", "]")) or len(t[0]) == 1
        or t[0].startswith("\\") else f"(?:{t[0]}){t[1]}")


def regexes():
    """Bounded regexes in Python syntax (no unbounded repetition)."""
    seq = st.lists(_piece(_atoms), min_size=1, max_size=5).map("".join)
    alt = st.lists(seq, min_size=1, max_size=3).map(lambda xs: "|".join(xs))
    return st.one_of(seq, alt, st.tuples(seq, alt).map(lambda t: f"{t[0]}({t[1]})"))


# --------------------------------------------------------------------------- SGLang's README

IP_REGEX = r"((25[0-5]|2[0-4]\d|[01]?\d\d?).){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)"
# SGLang's README character regex (its indentation as in the README source)
CHARACTER_REGEX = (
    r"""\{\n"""
    + r"""    "name": "[\w\d\s]{1,16}",\n"""
    + r"""    "house": "(Gryffindor|Slytherin|Ravenclaw|Hufflepuff)",\n"""
    + r"""    "blood status": "(Pure-blood|Half-blood|Muggle-born)",\n"""
    + r"""    "occupation": "(student|teacher|auror|ministry of magic|death eater|order of the phoenix)",\n"""
    + r"""    "wand": \{\n"""
    + r"""        "wood": "[\w\d\s]{1,16}",\n"""
    + r"""        "core": "[\w\d\s]{1,16}",\n"""
    + r"""        "length": [0-9]{1,2}\.[0-9]{0,2}\n"""
    + r"""    \},\n"""
    + r"""    "alive": "(Alive|Deceased)",\n"""
    + r"""    "patronus": "[\w\d\s]{1,16}",\n"""
    + r"""    "bogart": "[\w\d\s]{1,16}"\n"""
    + r"""\}"""
)
CHARACTER_PROMPT = ("{} is a character in Harry Potter. Please fill in the following "
                    "information about this character.\n")

# --------------------------------------------------------------------------- checks


def validates(text: str, schema: Any) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def full_match(text: str, regex: str) -> bool:
    return re.fullmatch(regex, text) is not None
