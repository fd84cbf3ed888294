"""Checks and rewrites of user grammars before xgrammar compiles them.

xgrammar silently ignores some JSON Schema keywords (`oneOf` is treated as `anyOf`,
`uniqueItems`, `contains`, `not`, number `multipleOf`, a `pattern` next to `maxLength`, ...)
and lets length-bounded strings hold raw control characters (invalid JSON). A constraint
that would not be enforced must be refused, never dropped, so every schema is checked
against the keywords we know xgrammar enforces, and a few are rewritten into equivalent
forms that it enforces exactly. The original schema is what outputs must validate against;
the rewritten copy is only what the grammar is built from.

Regexes follow Python's `re` (as SGLang users write them): `.` does not match a newline
(xgrammar's does), shorthand classes are ASCII (`\\w` is `[A-Za-z0-9_]`, like `re.ASCII`).
"""

from __future__ import annotations

import copy
import json
from typing import Any, Optional

from asgl.config import REGEX_CHARS_CEILING, SCHEMA_DEPTH_CEILING, SPEC_CHARS_CEILING
from asgl.engine.contracts.errors import InvalidRequest
from asgl.engine.contracts.sampling_params import SamplingParams

KINDS = ("regex", "json_schema", "ebnf", "structural_tag")
# The engine's own bounds, whoever submits (the server's --max-* limits are at most these).
MAX_SPEC_CHARS = SPEC_CHARS_CEILING  # the text of a schema, grammar or structural tag
MAX_REGEX_CHARS = REGEX_CHARS_CEILING
MAX_SCHEMA_DEPTH = SCHEMA_DEPTH_CEILING
MAX_COUNT = 10_000  # minLength / maxLength / minItems / maxItems: bigger ones compile slowly

_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
# Formats xgrammar 0.2.8 builds grammars for; others would be silently unchecked.
_FORMATS = frozenset({"date", "time", "date-time", "duration", "email", "hostname", "ipv4",
                      "ipv6", "uri", "uri-reference", "uuid"})
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "$schema",
                          "$id", "deprecated", "readOnly", "writeOnly", "contentMediaType",
                          "contentEncoding"})
_ENFORCED = frozenset({
    "type", "enum", "const", "anyOf", "allOf", "oneOf", "$ref", "$defs", "definitions",
    "properties", "required", "additionalProperties", "patternProperties",
    "items", "prefixItems", "minItems", "maxItems", "uniqueItems",
    "minLength", "maxLength", "pattern", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
})
_HINTS = {
    "oneOf": "use anyOf (oneOf's 'exactly one' cannot be enforced)",
    "nullable": "nullable is OpenAPI, not JSON Schema: use \"type\": [..., \"null\"]",
    "uniqueItems": "only uniqueItems: false can be enforced",
}
# A string that needs no escaping in JSON: what a length-bounded string may hold.
_PLAIN_CHAR = r'[^"\\\x00-\x1f\ud800-\udfff]'


def requested_grammar(sp: SamplingParams) -> Optional[tuple[str, str]]:
    """(kind, spec) of the constraint in `sp`, or None."""
    for kind in KINDS:
        spec = getattr(sp, kind, None)
        if spec is not None:
            return kind, spec
    return None


def check_spec_text(kind: str, spec: Any) -> str:
    if not isinstance(spec, str):
        raise InvalidRequest(f"{kind} must be a string", kind)
    limit = MAX_REGEX_CHARS if kind == "regex" else MAX_SPEC_CHARS
    if len(spec) > limit:
        raise InvalidRequest(f"{kind} is {len(spec)} characters long; the limit is {limit}", kind)
    return spec


# --------------------------------------------------------------------------- regex


# xgrammar's character classes span code points, surrogates included, and it emits a surrogate
# as its 3-byte (invalid) UTF-8 form: every class that could admit one is narrowed to exclude them.
_NO_SURROGATES = r"\ud800-\udfff"
# negated shorthands outside a class, as classes that also exclude surrogates
_NEGATED_SHORTHANDS = {"\\S": r"\s", "\\W": r"\w", "\\D": r"\d"}
_HEX = frozenset("0123456789abcdefABCDEF")
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}


def python_regex(regex: str) -> str:
    """`regex` for xgrammar with Python's meaning: every `.` outside a character class is
    `[^\\n]`, and no class, dot or negated shorthand admits a UTF-16 surrogate."""
    out: list[str] = []
    i, n = 0, len(regex)
    while i < n:
        c = regex[i]
        if c == "\\":
            esc = regex[i:i + 2]
            negated = _NEGATED_SHORTHANDS.get(esc)
            out.append(f"[^{negated}{_NO_SURROGATES}]" if negated else esc)
            i += 2
        elif c == "[":
            text, i = _char_class(regex, i)
            out.append(text)
        elif c == ".":
            out.append(f"[^\\n{_NO_SURROGATES}]")
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


# The character class of xgrammar's JSON string rule, as its printed grammar spells it.
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\\r\n]'


def json_strings_without_surrogates(ebnf: str) -> str:
    """xgrammar's printed JSON-schema grammar with its string characters narrowed as the
    regex classes are (the rule has the same hole)."""
    return ebnf.replace(_JSON_STRING_CHAR, _JSON_STRING_CHAR[:-1] + _NO_SURROGATES + "]")


def _char_class(regex: str, start: int) -> tuple[str, int]:
    """The class opening at `start`, rewritten to exclude surrogates, and the index after it.
    A negated class gets the surrogate range added; a range crossing them is split; literal
    `]`, `-` and `^` members are escaped."""
    i = start + 1
    negated = regex[i:i + 1] == "^"
    i += negated
    members: list[str] = []
    first = True
    while i < len(regex) and (regex[i] != "]" or first):  # a leading ']' is a literal
        first = False
        lo, i = _class_member(regex, i)
        if regex[i:i + 1] == "-" and regex[i + 1:i + 2] not in ("]", ""):
            hi, i = _class_member(regex, i + 1)
            members.append(_split_range(lo, hi))
        else:
            members.append(lo)
    if i >= len(regex):  # unterminated: left as written for xgrammar to refuse
        return regex[start:], len(regex)
    body = "".join(members)
    if negated:
        return f"[^{_NO_SURROGATES}{body}]", i + 1
    return f"[{body}]", i + 1


def _class_member(regex: str, i: int) -> tuple[str, int]:
    if regex[i] != "\\":
        # class syntax characters taken literally are escaped: members may be reordered
        return ("\\" + regex[i] if regex[i] in "]-^" else regex[i]), i + 1
    kind = regex[i + 1:i + 2]
    end = i + 2
    for _ in range({"x": 2, "u": 4, "U": 8}.get(kind, 0)):
        if regex[end:end + 1] not in _HEX:
            break  # malformed: kept as written for xgrammar to refuse
        end += 1
    return regex[i:end], end


def _code_point(member: str) -> int | None:
    if not member.startswith("\\"):
        return ord(member)
    kind = member[1:2]
    if kind in ("x", "u", "U"):
        try:
            return int(member[2:], 16)
        except ValueError:
            return None  # malformed: xgrammar reports it
    if kind in _SIMPLE_ESCAPES:
        return ord(_SIMPLE_ESCAPES[kind])
    return ord(kind) if kind and not kind.isalnum() else None


def _split_range(lo: str, hi: str) -> str:
    a, b = _code_point(lo), _code_point(hi)
    if a is None or b is None or a > 0xDFFF or b < 0xD800 or a > b:
        return f"{lo}-{hi}"
    parts = []
    if a < 0xD800:
        parts.append(f"{lo}-\\ud7ff")
    if b > 0xDFFF:
        parts.append(f"\\ue000-{hi}")
    return "".join(parts)


# --------------------------------------------------------------------------- JSON schema


def parse_json_schema(text: str) -> Any:
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InvalidRequest(f"json_schema is not valid JSON: {e}", "json_schema") from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequest("json_schema must be a JSON object (or a boolean)", "json_schema")
    return schema


def normalize_json_schema(schema: Any, param: str = "json_schema",
                          max_depth: int = MAX_SCHEMA_DEPTH) -> Any:
    """A copy of `schema` that xgrammar enforces exactly; InvalidRequest naming the first
    keyword that cannot be enforced (with its JSON path), a schema nested deeper than
    `max_depth`, or one with no finite instance."""
    check_schema_depth(schema, param, max_depth)  # first: what follows recurses
    normalized = copy.deepcopy(schema)
    _walk(normalized, "#", 0, param)
    check_finite_instances(schema, param)
    return normalized


# Keywords whose value is a subschema, a map of subschemas or a list of them: one nesting
# level below the schema that holds them (the same levels `_walk` descends).
_SUB_ONE = frozenset({"items", "additionalProperties", "not", "contains", "if", "then", "else",
                      "propertyNames", "additionalItems", "unevaluatedItems",
                      "unevaluatedProperties"})
_SUB_MAP = frozenset({"properties", "patternProperties", "$defs", "definitions",
                      "dependentSchemas"})
_SUB_LIST = frozenset({"anyOf", "allOf", "oneOf", "prefixItems"})


def check_schema_depth(schema: Any, param: str = "json_schema",
                       max_depth: int = MAX_SCHEMA_DEPTH) -> None:
    """InvalidRequest if `schema` nests more than `max_depth` levels: a subschema is one level
    below the schema holding it, and so is every object or array nested inside a value of a
    schema (enum, const, default, ...). Iterative, so any depth of input is safe to check."""
    stack: list[tuple[Any, int, bool, str]] = [(schema, 0, True, "#")]
    while stack:
        node, depth, is_schema, path = stack.pop()
        if depth > max_depth:
            where = path if len(path) <= 80 else f"{path[:40]}...{path[-36:]}"
            raise InvalidRequest(f"json_schema is nested more than {max_depth} levels deep (at "
                                 f"{where}); the limit is {max_depth} (--max-schema-depth)",
                                 param)
        if isinstance(node, list):
            stack.extend((v, depth + 1, False, f"{path}/{i}") for i, v in enumerate(node)
                         if isinstance(v, (dict, list)))
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            where = f"{path}/{key}"
            if not isinstance(value, (dict, list)):
                continue
            if not is_schema:
                stack.append((value, depth + 1, False, where))
            elif key in _SUB_MAP and isinstance(value, dict):
                stack.extend((v, depth + 1, True, f"{where}/{k}") for k, v in value.items())
            elif key in _SUB_LIST and isinstance(value, list) or \
                    key == "items" and isinstance(value, list):
                stack.extend((v, depth + 1, True, f"{where}/{i}") for i, v in enumerate(value))
            elif key in _SUB_ONE:
                stack.append((value, depth + 1, True, where))
            else:  # a value of this schema (enum, required, ...): its own level
                stack.append((value, depth, False, where))


# --------------------------------------------------------------------------- finite instances


def _pointer(root: Any, ref: str) -> Any:
    """The schema a local `$ref` points at, or None when it does not resolve (xgrammar then
    reports it)."""
    node = root
    for part in ref[2:].split("/") if ref.startswith("#/") else ():
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


class _Finite:
    """Which schemas of one document have a finite instance: the least fixed point of "this
    schema can be completed", like the productive symbols of a grammar. A schema whose every
    instance must contain itself (`{"properties": {"a": {"$ref": "#"}}, "required": ["a"]}`)
    has none; xgrammar compiles it, then its matcher follows the endless forced text until
    the process runs out of memory. Optional properties, arrays that may be empty and anyOf
    branches that end are ways out."""

    def __init__(self, root: Any):
        self.root = root
        self.nodes: dict[int, tuple[dict, str]] = {}  # id -> (schema, its first path)
        self.used: set[int] = set()  # reachable from the root, $defs only through $ref
        self.done: set[int] = set()
        self._discover()

    def _discover(self) -> None:
        """Every schema object, with the first path that reaches it."""
        stack: list[tuple[Any, str, bool]] = [(self.root, "#", True)]
        while stack:
            node, path, used = stack.pop()
            if not isinstance(node, dict):
                continue
            key = id(node)
            if key in self.nodes and (not used or key in self.used):
                continue
            self.nodes.setdefault(key, (node, path))
            if used:
                self.used.add(key)
            for child, where, child_used in self._children(node, path):
                stack.append((child, where, used and child_used))

    def _children(self, node: dict, path: str) -> list[tuple[Any, str, bool]]:
        out: list[tuple[Any, str, bool]] = []
        for key in _SUB_ONE:
            if key in node:
                out.append((node[key], f"{path}/{key}", True))
        for key in _SUB_MAP:
            value = node.get(key)
            if isinstance(value, dict):  # $defs are used only where a $ref reaches them
                out += [(v, f"{path}/{key}/{k}", key not in ("$defs", "definitions"))
                        for k, v in value.items()]
        for key in _SUB_LIST:
            value = node.get(key)
            if isinstance(value, list):
                out += [(v, f"{path}/{key}/{i}", True) for i, v in enumerate(value)]
        ref = node.get("$ref")
        if isinstance(ref, str):
            target = _pointer(self.root, ref)
            out.append((target, ref, True))
        return out

    def ok(self, schema: Any) -> bool:
        if isinstance(schema, bool):
            return schema
        return not isinstance(schema, dict) or id(schema) in self.done

    def finite(self, node: dict) -> bool:
        """Whether `node` has a finite instance, given those known so far."""
        ref = node.get("$ref")
        if isinstance(ref, str):  # xgrammar follows the reference and ignores the rest
            target = _pointer(self.root, ref)
            return target is None or self.ok(target)
        if "enum" in node or "const" in node:
            return True
        for key in ("allOf", "oneOf"):
            if isinstance(node.get(key), list) and not all(self.ok(s) for s in node[key]):
                return False
        if isinstance(node.get("anyOf"), list) and not any(self.ok(s) for s in node["anyOf"]):
            return False
        types = _types(node) if isinstance(node.get("type"), (str, list)) else set()
        if not types:  # inferred from the keywords, as xgrammar does; none: any value
            if {"properties", "required", "patternProperties", "additionalProperties"} & set(node):
                types.add("object")
            if {"items", "prefixItems", "minItems"} & set(node):
                types.add("array")
            if not types:
                return True
        return any(self._type_finite(node, t) for t in types)

    def _type_finite(self, node: dict, kind: str) -> bool:
        if kind == "object":
            props = node.get("properties")
            props = props if isinstance(props, dict) else {}
            required = node.get("required")
            return all(self.ok(props.get(r, True)) for r in
                       (required if isinstance(required, list) else ()) if isinstance(r, str))
        if kind == "array":
            least = node.get("minItems")
            least = least if isinstance(least, int) and not isinstance(least, bool) else 0
            prefix = node.get("prefixItems")
            prefix = prefix if isinstance(prefix, list) else []
            if not all(self.ok(s) for s in prefix[:least]):
                return False
            return least <= len(prefix) or self.ok(node.get("items", True))
        return True

    def solve(self) -> None:
        dependents: dict[int, list[dict]] = {}
        for node, _ in self.nodes.values():
            for child, _, _ in self._children(node, ""):
                if isinstance(child, dict):
                    dependents.setdefault(id(child), []).append(node)
        # deepest first, so most schemas are settled on their first visit
        stack = [node for node, _ in self.nodes.values()]
        while stack:
            node = stack.pop()
            if id(node) in self.done or not self.finite(node):
                continue
            self.done.add(id(node))
            stack.extend(dependents.get(id(node), ()))

    def first_endless(self) -> Optional[str]:
        """The path of the first schema in use that has no finite instance, or None."""
        for key, (_, path) in self.nodes.items():
            if key in self.used and key not in self.done:
                return path
        return None


def check_finite_instances(schema: Any, param: str = "json_schema") -> None:
    """InvalidRequest if a schema the output could reach has no finite instance: a `$ref`
    cycle through required properties (or non-empty arrays, allOf) with no way out."""
    finite = _Finite(schema)
    finite.solve()
    path = finite.first_endless()
    if path is not None:
        raise _fail(path, "this schema has no finite instance: every instance would contain "
                    "itself (a $ref cycle through required properties, minItems or allOf); "
                    "make a property on the cycle optional, or add an anyOf branch that ends "
                    "it", param)


def _fail(path: str, message: str, param: str) -> InvalidRequest:
    return InvalidRequest(f"json_schema at {path}: {message}", param)


def _walk(node: Any, path: str, depth: int, param: str) -> None:
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise _fail(path, "a schema must be an object or a boolean", param)
    if depth > MAX_SCHEMA_DEPTH:
        raise _fail(path, f"nested deeper than {MAX_SCHEMA_DEPTH} levels", param)
    for key in node:
        if key in _ENFORCED or key in _ANNOTATIONS or key.startswith("x-"):
            continue
        hint = _HINTS.get(key, "it cannot be enforced by the grammar backend")
        raise _fail(path, f"keyword {key!r} is not supported: {hint}", param)
    _check_type(node, path, param)
    _check_combinators(node, path, depth, param)
    _check_object(node, path, depth, param)
    _check_array(node, path, depth, param)
    _check_string(node, path, param)
    _check_number(node, path, param)


def _types(node: dict) -> set[str]:
    t = node.get("type")
    if t is None:
        return set()
    return {t} if isinstance(t, str) else set(t)


def _check_type(node: dict, path: str, param: str) -> None:
    t = node.get("type")
    if t is None:
        return
    names = [t] if isinstance(t, str) else t
    if not isinstance(names, list) or not names or \
            not all(isinstance(x, str) and x in _TYPES for x in names):
        raise _fail(path, f"type must be one of {sorted(_TYPES)} or a list of them", param)


def _check_combinators(node: dict, path: str, depth: int, param: str) -> None:
    if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
        raise _fail(path, "enum must be a non-empty list", param)
    for key in ("anyOf", "allOf", "oneOf"):
        if key not in node:
            continue
        subs = node[key]
        if not isinstance(subs, list) or not subs:
            raise _fail(path, f"{key} must be a non-empty list of schemas", param)
        if key != "anyOf" and len(subs) > 1:
            what = "use anyOf (oneOf's 'exactly one' cannot be enforced)" if key == "oneOf" \
                else "merge the schemas (only a single-entry allOf can be enforced)"
            raise _fail(path, f"{key} with {len(subs)} entries is not supported: {what}", param)
        for i, sub in enumerate(subs):
            _walk(sub, f"{path}/{key}/{i}", depth + 1, param)
    for k in ("$defs", "definitions"):
        defs = node.get(k)
        if defs is None:
            continue
        if not isinstance(defs, dict):
            raise _fail(path, f"{k} must be an object of schemas", param)
        for name, sub in defs.items():
            _walk(sub, f"{path}/{k}/{name}", depth + 1, param)
    ref = node.get("$ref")
    if ref is not None and (not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/"))):
        raise _fail(path, f"$ref {ref!r} is not supported: only local references ('#/...')",
                    param)


def _check_object(node: dict, path: str, depth: int, param: str) -> None:
    props = node.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            raise _fail(path, "properties must be an object of schemas", param)
        for name, sub in props.items():
            _walk(sub, f"{path}/properties/{name}", depth + 1, param)
    pattern_props = node.get("patternProperties")
    if pattern_props is not None:
        if not isinstance(pattern_props, dict):
            raise _fail(path, "patternProperties must be an object of schemas", param)
        for pattern in list(pattern_props):
            _walk(pattern_props[pattern], f"{path}/patternProperties/{pattern}", depth + 1, param)
            pattern_props[python_regex(pattern)] = pattern_props.pop(pattern)
    required = node.get("required")
    if required is not None and (not isinstance(required, list) or
                                 not all(isinstance(r, str) for r in required)):
        raise _fail(path, "required must be a list of property names", param)
    missing = [r for r in required or () if r not in (props or {})]
    if missing:
        # xgrammar only generates declared properties: such a key would never be produced
        raise _fail(path, f"required property {missing[0]!r} is not declared in properties",
                    param)
    extra = node.get("additionalProperties")
    if extra is not None:
        _walk(extra, f"{path}/additionalProperties", depth + 1, param)
    elif "object" in _types(node) and props is None and pattern_props is None:
        # A bare {"type": "object"} is any object; xgrammar's strict mode would allow only {}.
        node["additionalProperties"] = True


def _check_array(node: dict, path: str, depth: int, param: str) -> None:
    if node.get("uniqueItems", False) is not False:
        raise _fail(path, "uniqueItems: true cannot be enforced", param)
    items = node.get("items")
    if items is not None:
        _walk(items, f"{path}/items", depth + 1, param)
    prefix = node.get("prefixItems")
    if prefix is not None:
        if not isinstance(prefix, list):
            raise _fail(path, "prefixItems must be a list of schemas", param)
        for i, sub in enumerate(prefix):
            _walk(sub, f"{path}/prefixItems/{i}", depth + 1, param)
    elif items is None and "array" in _types(node):
        node["items"] = True  # any items (strict mode would allow only [])
    _check_counts(node, path, "minItems", "maxItems", param)


def _check_counts(node: dict, path: str, lo_key: str, hi_key: str, param: str) -> None:
    lo, hi = node.get(lo_key), node.get(hi_key)
    for key, value in ((lo_key, lo), (hi_key, hi)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not 0 <= value <= MAX_COUNT):
            raise _fail(path, f"{key} must be an integer in [0, {MAX_COUNT}]", param)
    if lo is not None and hi is not None and lo > hi:
        raise _fail(path, f"{lo_key} {lo} exceeds {hi_key} {hi}: nothing can match", param)


def _check_string(node: dict, path: str, param: str) -> None:
    _check_counts(node, path, "minLength", "maxLength", param)
    has_len = "minLength" in node or "maxLength" in node
    pattern, fmt = node.get("pattern"), node.get("format")
    if pattern is not None:
        if not isinstance(pattern, str):
            raise _fail(path, "pattern must be a string", param)
        if has_len or fmt is not None:
            raise _fail(path, "pattern together with minLength/maxLength/format cannot be "
                        "enforced: put the length into the pattern (e.g. ^[a-z]{1,8}$)", param)
        node["pattern"] = python_regex(pattern)
    if fmt is not None:
        if fmt not in _FORMATS:
            raise _fail(path, f"format {fmt!r} is not supported (supported: "
                        f"{', '.join(sorted(_FORMATS))})", param)
        if has_len:
            raise _fail(path, "format together with minLength/maxLength cannot be enforced",
                        param)
    if has_len and pattern is None and fmt is None:
        # xgrammar's length-bounded strings admit raw control characters (invalid JSON):
        # the same bounds as a pattern over characters that need no escaping.
        lo, hi = node.pop("minLength", 0), node.pop("maxLength", None)
        node["pattern"] = f"^{_PLAIN_CHAR}{{{lo},{'' if hi is None else hi}}}$"


def _check_number(node: dict, path: str, param: str) -> None:
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        value = node.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise _fail(path, f"{key} must be a number", param)
    lo, hi = node.get("minimum"), node.get("maximum")
    if lo is not None and hi is not None and lo > hi:
        raise _fail(path, f"minimum {lo} exceeds maximum {hi}: nothing can match", param)
    if "multipleOf" in node:
        step = node["multipleOf"]
        if _types(node) != {"integer"} or not isinstance(step, int) or isinstance(step, bool) \
                or step <= 0:
            raise _fail(path, "multipleOf can only be enforced as a positive integer on "
                        "type: integer", param)


# --------------------------------------------------------------------------- structural tags


def normalize_structural_tag(text: str) -> str:
    """A structural tag (xgrammar's format) with every JSON schema and regex inside it
    checked and rewritten like top-level ones."""
    try:
        tag = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InvalidRequest(f"structural_tag is not valid JSON: {e}", "structural_tag") from None
    if not isinstance(tag, dict):
        raise InvalidRequest("structural_tag must be a JSON object", "structural_tag")
    _walk_tag(tag, 0)
    return json.dumps(tag)


def _walk_tag(node: Any, depth: int) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidRequest("structural_tag is nested too deeply", "structural_tag")
    if isinstance(node, list):
        for item in node:
            _walk_tag(item, depth + 1)
        return
    if not isinstance(node, dict):
        return
    if node.get("type") == "json_schema" and "json_schema" in node:
        node["json_schema"] = normalize_json_schema(node["json_schema"], "structural_tag")
        return
    if node.get("type") == "regex" and isinstance(node.get("pattern"), str):
        node["pattern"] = python_regex(node["pattern"])
        return
    for value in node.values():
        _walk_tag(value, depth + 1)
