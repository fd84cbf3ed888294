"""`gen` and `select`: the expressions that ask the backend for text.

They live apart from api.py because `ProgramState.gen`/`.select` build the same
expressions, and state.py sits below api.py in the module graph.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Union

from asgl.lang import choices as choices_mod
from asgl.lang import ir, sampling

_DTYPES = {int: "int", float: "float", str: "str", bool: "bool", "int": "int",
           "float": "float", "str": "str", "bool": "bool"}


def gen(name: Optional[str] = None, max_tokens: Optional[int] = None, *,
        min_tokens: Optional[int] = None, stop: Union[str, list[str], None] = None,
        stop_token_ids: Optional[list[int]] = None, temperature: Optional[float] = None,
        top_p: Optional[float] = None, top_k: Optional[int] = None,
        min_p: Optional[float] = None, frequency_penalty: Optional[float] = None,
        presence_penalty: Optional[float] = None, repetition_penalty: Optional[float] = None,
        ignore_eos: Optional[bool] = None, seed: Optional[int] = None,
        regex: Optional[str] = None, json_schema: Any = None,
        choices: Optional[list[str]] = None, dtype: Any = None,
        return_logprob: Optional[bool] = None, logprob_start_len: Optional[int] = None,
        top_logprobs_num: Optional[int] = None, return_text_in_logprobs: Optional[bool] = None,
        choices_method: Any = None,
        stop_regex: Union[str, list[str], None] = None) -> Union[ir.Gen, ir.Select]:
    """Generate text into the state (and into `s[name]`). With `choices`, a `select`.

    `dtype=int|float|str|bool` constrains the text to SGLang's regex for the type (ir.py)
    where the backend takes a regex, else parses the value out of the answer (base.py).
    `return_logprob=True` (with `top_logprobs_num`, `logprob_start_len`) puts SGLang's
    `output_token_logprobs` / `output_top_logprobs` / `input_token_logprobs` in
    `s.get_meta_info(name)`. `stop_regex` (SGLang's) ends the text where a pattern
    matches, on backends whose server implements it (asgl's, SGLang's)."""
    if choices is not None:
        return select(name, choices, temperature=temperature or 0.0,
                      choices_method=choices_method)
    typed = None
    if dtype is not None:
        typed = _DTYPES.get(dtype)
        if typed is None:
            raise ValueError(f"gen(dtype={dtype!r}): use int, float, str or bool")
        if regex is not None:  # as in SGLang: the type decides
            warnings.warn(f"gen(dtype={typed}, regex=...): the dtype's regex is used")
            regex = None
    params = sampling.clean(dict(
        max_new_tokens=max_tokens, min_new_tokens=min_tokens, stop=stop,
        stop_token_ids=stop_token_ids, temperature=temperature, top_p=top_p, top_k=top_k,
        min_p=min_p, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        repetition_penalty=repetition_penalty, ignore_eos=ignore_eos, seed=seed, regex=regex,
        json_schema=json_schema, return_logprob=return_logprob,
        logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
        return_text_in_logprobs=return_text_in_logprobs, stop_regex=stop_regex))
    if "regex" in params and "json_schema" in params:
        raise ValueError("give at most one of regex and json_schema")
    if typed is not None and "json_schema" in params:
        raise ValueError("give at most one of dtype and json_schema")
    return ir.Gen(name, params, typed)


def gen_int(name: Optional[str] = None, max_tokens: Optional[int] = None,
            **kwargs: Any) -> ir.Gen:
    """An integer (SGLang's REGEX_INT): `gen(name, dtype=int)`."""
    return gen(name, max_tokens, dtype=int, **kwargs)


def gen_string(name: Optional[str] = None, max_tokens: Optional[int] = None,
               **kwargs: Any) -> ir.Gen:
    """A double-quoted string (SGLang's REGEX_STR): `gen(name, dtype=str)`."""
    return gen(name, max_tokens, dtype=str, **kwargs)


def select(name: Optional[str] = None, choices: Optional[list[str]] = None,
           temperature: float = 0.0, choices_method: Any = None) -> ir.Select:
    """Append the most likely of `choices`: on backends that score prompts, by
    `choices_method` (choices.py; token-length-normalized log-probability by default); on
    the others, a constrained generation."""
    choices = list(choices or [])
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"select needs a list of non-empty strings, got {choices!r}")
    return ir.Select(name, choices, temperature, choices_mod.resolve(choices_method))
