"""Tool calls without a model: the required / named grammars driven by random token walks
parse into valid calls, and the incremental parsers give the same calls and content however
the text is split into deltas (stream deltas concatenate to the final arguments)."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgl.server.tool_calls import ToolSetup, get_format
from test_grammar import backend, tokenizer, walk  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(300)

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                         "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": -9, "maximum": 99},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "ping"}},  # no parameters: {}
]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"})
           for t in TOOLS}


def parse_in_pieces(fmt, text: str, cuts: list[int]):
    """Feed `text` split at `cuts`; returns (content, calls rebuilt from the deltas, the
    parser's own totals)."""
    parser = fmt.parser()
    content, calls = [], {}
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    for delta in [parser.feed(p) for p in pieces] + [parser.finish()]:
        content.append(delta[0])
        for d in delta[1]:
            if d.id is not None:
                assert d.index not in calls  # id and name once per call
                calls[d.index] = [d.name, ""]
            calls[d.index][1] += d.arguments
    rebuilt = [tuple(calls[i]) for i in sorted(calls)]
    return "".join(content), rebuilt, [(c.name, c.arguments) for c in parser.calls], parser


@pytest.mark.parametrize("parser_name", ["hermes", "llama3"])
@pytest.mark.parametrize("choice, parallel", [("required", True), ("required", False),
                                              ({"type": "function",
                                                "function": {"name": "add"}}, True)])
def test_required_and_named_grammars_yield_valid_calls(backend, tokenizer, parser_name,  # noqa: F811
                                                       choice, parallel):
    fmt = get_format(parser_name)
    setup = ToolSetup.from_request(TOOLS, choice, parallel)
    compiled = backend.compile_sync("structural_tag", fmt.structural_tag(setup))
    rng = random.Random(7)
    seen = set()
    for _ in range(6):
        text, finished = walk(backend, compiled, tokenizer, rng, max_tokens=200, p_stop=0.6)
        if not finished:
            continue
        content, rebuilt, calls, _ = parse_in_pieces(fmt, text, sorted(
            rng.sample(range(1, len(text)), min(8, len(text) - 1))))
        assert content == "" and calls and rebuilt == calls, text
        if choice == "required" and not parallel or isinstance(choice, dict):
            assert len(calls) == 1
        for name, args in calls:
            assert name in SCHEMAS and (choice == "required" or name == "add")
            jsonschema.validate(json.loads(args), SCHEMAS[name])
            seen.add(name)
    assert seen


OUTPUTS = {
    "hermes": [
        'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
        '"unit": "c"}}\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, '
        '"b": 2}}\n</tool_call>',
        "Just text, with a < sign and <tool_ but no call.",
        '<tool_call>{"arguments": {"x": "}"}, "name": "odd_order"}</tool_call>',
        "<tool_call>not json</tool_call> then text",
        '<tool_call>\n{"name": "add", "arguments": {"a": 4',  # cut off by the length limit
    ],
    "llama3": [
        '{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "ping", "parameters": {}}',
        "A plain answer {with braces}.",
        '<|python_tag|>{"parameters": {"q": "a;b"}, "name": "search"}',
    ],
}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=st.sampled_from([(k, i) for k, v in OUTPUTS.items() for i in range(len(v))]),
       data=st.data())
def test_parsers_give_the_same_result_however_the_text_is_split(case, data):
    name, i = case
    fmt, text = get_format(name), OUTPUTS[name][i]
    whole = parse_in_pieces(fmt, text, [])
    cuts = sorted(data.draw(st.sets(st.integers(1, len(text) - 1), max_size=12)))
    split = parse_in_pieces(fmt, text, cuts)
    assert split[:3] == whole[:3]
    assert whole[1] == whole[2] and whole[0] == whole[3].content


def test_parsed_examples():
    hermes, llama = get_format("hermes"), get_format("llama3")
    content, _, calls, _ = parse_in_pieces(hermes, OUTPUTS["hermes"][0], [])
    assert content == "Let me check." and [c[0] for c in calls] == ["get_weather", "add"]
    assert calls[0][1] == '{"city": "Paris", "unit": "c"}'  # raw, as generated
    assert parse_in_pieces(hermes, OUTPUTS["hermes"][1], [])[2] == []
    assert parse_in_pieces(hermes, OUTPUTS["hermes"][2], [])[2] == [("odd_order", '{"x": "}"}')]
    content, _, calls, _ = parse_in_pieces(hermes, OUTPUTS["hermes"][3], [])
    assert calls == [] and content == OUTPUTS["hermes"][3]
    assert parse_in_pieces(hermes, OUTPUTS["hermes"][4], [])[2] == [("add", '{"a": 4')]
    assert [c[0] for c in parse_in_pieces(llama, OUTPUTS["llama3"][0], [])[2]] == ["add", "ping"]
    assert parse_in_pieces(llama, OUTPUTS["llama3"][1], [])[0] == OUTPUTS["llama3"][1]
    assert parse_in_pieces(llama, OUTPUTS["llama3"][2], [])[2] == [("search", '{"q": "a;b"}')]


def test_tool_request_validation():
    from asgl.server.errors import ApiError

    for tools, choice in [([{"type": "function", "function": {"name": "a b"}}], None),
                          ([{"type": "retrieval"}], None),
                          (TOOLS, {"type": "function", "function": {"name": "nope"}}),
                          (TOOLS, "sometimes"), (None, "required"),
                          ([{"type": "function", "function": {"name": "f", "parameters": {
                              "type": "array"}}}], None),
                          ([{"type": "function", "function": {"name": "f", "parameters": {
                              "type": "object", "properties": {"x": {"not": {}}}}}}], None)]:
        with pytest.raises(ApiError):
            ToolSetup.from_request(tools, choice, None)
    assert ToolSetup.from_request(None, "none", None) is None
    with pytest.raises(ValueError):
        get_format("nonsense")
