"""`gen` and `select`: the expressions that ask the backend for text.

They live apart from api.py because `ProgramState.gen`/`.select` build the same
expressions, and state.py sits below api.py in the module graph.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from asgl.lang import ir, sampling


def gen(name: Optional[str] = None, max_tokens: Optional[int] = None, *,
        min_tokens: Optional[int] = None, stop: Union[str, list[str], None] = None,
        stop_token_ids: Optional[list[int]] = None, temperature: Optional[float] = None,
        top_p: Optional[float] = None, top_k: Optional[int] = None,
        min_p: Optional[float] = None, frequency_penalty: Optional[float] = None,
        presence_penalty: Optional[float] = None, repetition_penalty: Optional[float] = None,
        ignore_eos: Optional[bool] = None, seed: Optional[int] = None,
        regex: Optional[str] = None, json_schema: Any = None,
        choices: Optional[list[str]] = None) -> Union[ir.Gen, ir.Select]:
    """Generate text into the state (and into `s[name]`). With `choices`, a `select`."""
    if choices is not None:
        return select(name, choices, temperature=temperature or 0.0)
    params = sampling.clean(dict(
        max_new_tokens=max_tokens, min_new_tokens=min_tokens, stop=stop,
        stop_token_ids=stop_token_ids, temperature=temperature, top_p=top_p, top_k=top_k,
        min_p=min_p, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        repetition_penalty=repetition_penalty, ignore_eos=ignore_eos, seed=seed, regex=regex,
        json_schema=json_schema))
    if "regex" in params and "json_schema" in params:
        raise ValueError("give at most one of regex and json_schema")
    return ir.Gen(name, params)


def select(name: Optional[str] = None, choices: Optional[list[str]] = None,
           temperature: float = 0.0) -> ir.Select:
    """Append the most likely of `choices` (token-length-normalized log-probability on
    backends that score prompts; a constrained generation on the others)."""
    choices = list(choices or [])
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"select needs a list of non-empty strings, got {choices!r}")
    return ir.Select(name, choices, temperature)
