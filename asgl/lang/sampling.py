"""Sampling parameters of `gen`, and the run-wide defaults of `fn.run(temperature=...)`.

Names follow asgl's `SamplingParams` (`max_new_tokens`, ...); `gen(max_tokens=...)` is
SGLang's spelling of `max_new_tokens`. Only values given explicitly are kept, so a run-wide
default fills what a `gen` leaves out, and a backend's own default what both leave out.
"""

from __future__ import annotations

import json
from typing import Any, Optional

# SGLang's default for `gen`; also what keeps API backends that require a number (Anthropic)
# in line with the others.
DEFAULT_MAX_NEW_TOKENS = 128

SAMPLING_KEYS = ("max_new_tokens", "min_new_tokens", "stop", "stop_token_ids", "temperature",
                 "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
                 "repetition_penalty", "ignore_eos", "seed", "stop_regex")
CONSTRAINT_KEYS = ("regex", "json_schema")
# Request options rather than sampling: what logprobs to report (SGLang's names). Backends
# take them out of the params (native.py) or refuse them (BackendError naming the option).
LOGPROB_KEYS = ("return_logprob", "logprob_start_len", "top_logprobs_num",
                "return_text_in_logprobs")


def clean(params: dict[str, Any]) -> dict[str, Any]:
    """Drop unset values; `stop` becomes a list; a JSON schema becomes a JSON string."""
    out = {k: v for k, v in params.items() if v is not None}
    if isinstance(out.get("stop"), str):
        out["stop"] = [out["stop"]]
    if "json_schema" in out:
        out["json_schema"] = schema_text(out["json_schema"])
    unknown = set(out) - set(SAMPLING_KEYS) - set(CONSTRAINT_KEYS) - set(LOGPROB_KEYS)
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
    return out


def merge(defaults: dict[str, Any], explicit: dict[str, Any]) -> dict[str, Any]:
    """What one gen runs with: its own values, then the run's, then our max_new_tokens."""
    return {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, **defaults, **explicit}


def schema_text(schema: Any) -> str:
    """A JSON schema as text, from a string, a dict, or a pydantic model class."""
    if isinstance(schema, str):
        return schema
    to_schema = getattr(schema, "model_json_schema", None)
    if to_schema is not None:
        return json.dumps(to_schema())
    return json.dumps(schema)


def split_run_kwargs(kwargs: dict[str, Any], program_params: set[str],
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """`fn.run(question=..., temperature=0)`: (program arguments, sampling defaults). A name
    the program declares is always the program's."""
    args, defaults = {}, {}
    for key, value in kwargs.items():
        if key in program_params or key not in SAMPLING_KEYS + LOGPROB_KEYS:
            args[key] = value
        else:
            defaults[key] = value
    return args, clean(defaults)


def stop_list(params: dict[str, Any]) -> list[str]:
    return list(params.get("stop") or [])


def truncate_at_stop(text: str, stops: list[str]) -> tuple[str, Optional[str]]:
    """`text` cut before the earliest stop string, and that stop (None if none occurs)."""
    best, hit = len(text), None
    for s in stops:
        i = text.find(s)
        if 0 <= i < best:
            best, hit = i, s
    return text[:best], hit


def split_logprob(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(sampling parameters, logprob options): the runtimes take the latter per request."""
    sampling = {k: v for k, v in params.items() if k not in LOGPROB_KEYS}
    return sampling, {k: params[k] for k in LOGPROB_KEYS if k in params}


def wants_logprobs(params: dict[str, Any]) -> bool:
    return bool(params.get("return_logprob"))
