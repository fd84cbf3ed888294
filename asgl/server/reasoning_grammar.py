"""A grammar that starts after the reasoning: with --reasoning-parser, a request's
constraint (response_format / json_schema, regex, ebnf, a tool_choice grammar) applies to
the answer, not to the thinking, as SGLang and vLLM do for reasoning models.

The constraint becomes one xgrammar structural tag: free text up to the family's end tag
(the reasoning), optional whitespace, then the constraint. Families whose output may open
with the start tag or skip thinking altogether (qwen3, glm45, kimi) may also answer at
once; those whose template opened the reasoning (deepseek-r1, qwen3-thinking) must close
it first. gpt-oss's harmony channels are not wrapped (not yet: its markers are special
tokens: such a request is a 400); a request that turned thinking off is not wrapped.
"""

from __future__ import annotations

import json
from typing import Optional

import msgspec

from asgl.engine.contracts.sampling_params import SamplingParams
from asgl.server.errors import bad_request

# parser -> (start tag the output may open with, "" when the prompt opened it; end tag)
_THINK = {
    "deepseek-r1": ("", "</think>"),
    "qwen3-thinking": ("", "</think>"),
    "qwen3": ("<think>", "</think>"),
    "glm45": ("<think>", "</think>"),
    "deepseek-v3": ("<think>", "</think>"),
    "kimi": ("\u25c1think\u25b7", "\u25c1/think\u25b7"),
}


def _inner(sp: SamplingParams) -> Optional[dict]:
    """The request's constraint as a structural-tag format node, or None."""
    if sp.json_schema is not None:
        return {"type": "json_schema", "json_schema": json.loads(sp.json_schema)}
    if sp.regex is not None:
        return {"type": "regex", "pattern": sp.regex}
    if sp.ebnf is not None:
        return {"type": "grammar", "grammar": sp.ebnf}
    if sp.structural_tag is not None:
        tag = json.loads(sp.structural_tag)
        return tag.get("format") if isinstance(tag, dict) else None
    return None


def after_reasoning(sp: SamplingParams, parser: Optional[str],
                    thinking: Optional[bool]) -> SamplingParams:
    """`sp` with its constraint moved after the reasoning (unchanged when there is no
    constraint, no think-tag parser, or thinking is off)."""
    if parser == "gpt-oss" and _inner(sp) is not None:
        raise bad_request("a grammar (response_format, regex, ebnf, tool_choice required) "
                          "with --reasoning-parser gpt-oss is not supported yet: the harmony "
                          "channels would be constrained too", "response_format")
    if parser not in _THINK or thinking is False:
        return sp
    inner = _inner(sp)
    if inner is None:
        return sp
    start, end = _THINK[parser]
    think = {"type": "tag", "begin": start, "content": {"type": "any_text"}, "end": end}
    answer = {"type": "sequence", "elements": [
        think, {"type": "regex", "pattern": r"\s*"}, inner]}
    fmt = answer if not start else {"type": "or", "elements": [answer, inner]}
    return msgspec.structs.replace(
        sp, json_schema=None, regex=None, ebnf=None,
        structural_tag=json.dumps({"type": "structural_tag", "format": fmt}))
