"""`response_format: {"type": "structural_tag", ...}` on the OpenAI routes, in both forms
the peers accept, as the xgrammar structural tag the grammar layer compiles:

- the legacy form (OpenAI's early proposal; SGLang and vLLM both take it):
  `{"type": "structural_tag", "structures": [{"begin", "schema", "end"}, ...],
  "triggers": [...]}`: free text, where text starting with a trigger must go on as one of
  the structures whose `begin` starts with it (its content a JSON value of `schema`);
- xgrammar's form (vLLM and SGLang pass it through): `{"type": "structural_tag",
  "format": {...}}`.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from asgl.server.errors import bad_request

_PARAM = "response_format"


def structural_tag_of(fmt: Optional[dict[str, Any]]) -> Optional[str]:
    """The xgrammar structural tag (JSON text) that `response_format` asks for, or None
    when it asks for something else."""
    if not isinstance(fmt, dict) or fmt.get("type") != "structural_tag":
        return None
    if "format" in fmt:
        if not isinstance(fmt["format"], dict):
            raise bad_request("response_format.format must be an object (xgrammar's "
                              "structural tag format)", _PARAM)
        return json.dumps({"type": "structural_tag", "format": fmt["format"]})
    structures, triggers = fmt.get("structures"), fmt.get("triggers")
    if not isinstance(structures, list) or not structures or not isinstance(triggers, list) \
            or not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise bad_request("response_format structural_tag needs `structures` (a list of "
                          "{begin, schema, end}) and `triggers` (non-empty strings), or "
                          "`format`", _PARAM)
    tags = []
    for i, s in enumerate(structures):
        if not isinstance(s, dict) or not all(isinstance(s.get(k), str) for k in
                                              ("begin", "end")):
            raise bad_request(f"response_format.structures[{i}] needs string `begin` and "
                              f"`end`", _PARAM)
        if not any(s["begin"].startswith(t) for t in triggers):
            raise bad_request(f"response_format.structures[{i}].begin {s['begin']!r} starts "
                              f"with none of the triggers", _PARAM)
        schema = s.get("schema", s.get("parameters", {}))
        if not isinstance(schema, (dict, bool)):
            raise bad_request(f"response_format.structures[{i}].schema must be a JSON schema",
                              _PARAM)
        tags.append({"type": "tag", "begin": s["begin"],
                     "content": {"type": "json_schema", "json_schema": schema},
                     "end": s["end"]})
    return json.dumps({"type": "structural_tag", "format": {
        "type": "triggered_tags", "triggers": triggers, "tags": tags}})
