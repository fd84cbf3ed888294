"""Per-request sampling parameters, as users of SGLang's `sampling_params` know them.

`SamplingParams.validate(vocab_size)` rejects every value that cannot work with an
`InvalidRequest` naming the field; the engine calls it before anything is queued.
"""

from __future__ import annotations

from typing import Optional, Union

import msgspec

from asgl.config import STOP_STRING_CHARS_CEILING, STOP_STRINGS_CEILING
from asgl.engine.contracts.errors import InvalidRequest


_INT32 = 2**31
# A repetition penalty divides positive logits of seen tokens (HF semantics): a tiny one
# overflows them to inf (1e-300 does at once), and the step's softmax turns that into NaN.
# At 0.01 a logit grows 100x at most, and then even the floored temperature (1e-5) keeps
# every value finite in float32; below it the penalty means "repeat", which 0.01 already is.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 2.0


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    max_new_tokens: Optional[int] = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    seed: Optional[int] = None
    logit_bias: Optional[dict[str, float]] = None
    # constrained decoding (the grammar layer reads these)
    regex: Optional[str] = None
    json_schema: Optional[str] = None
    ebnf: Optional[str] = None
    structural_tag: Optional[str] = None  # xgrammar's structural tag format, as JSON text
    # SGLang's stop_regex: generation stops where one of these matches (loop/stop_regex.py)
    stop_regex: Union[str, list[str], None] = None
    # salts the prefix-cache key: requests with different salts never share cached KV
    # (vLLM's cache_salt, against timing attacks across tenants)
    cache_salt: Optional[str] = None

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def stop_regexes(self) -> list[str]:
        if self.stop_regex is None:
            return []
        return [self.stop_regex] if isinstance(self.stop_regex, str) else list(self.stop_regex)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)

    def logit_bias_items(self) -> list[tuple[int, float]]:
        """logit_bias with integer token ids (JSON object keys arrive as strings)."""
        if not self.logit_bias:
            return []
        return [(int(k), float(v)) for k, v in self.logit_bias.items()]

    def validate(self, vocab_size: int | None = None) -> None:
        def bad(msg: str, param: str) -> InvalidRequest:
            return InvalidRequest(msg, param)

        for name in ("max_new_tokens", "min_new_tokens", "top_k", "n"):
            value = getattr(self, name)
            if value is not None and abs(value) >= _INT32:
                raise bad(f"{name} is out of range: {value}", name)
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise bad(f"max_new_tokens must be >= 0, got {self.max_new_tokens}", "max_new_tokens")
        if self.min_new_tokens < 0:
            raise bad(f"min_new_tokens must be >= 0, got {self.min_new_tokens}", "min_new_tokens")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise bad("min_new_tokens must not exceed max_new_tokens", "min_new_tokens")
        if not (self.temperature >= 0.0) or self.temperature > 1e4:
            raise bad(f"temperature must be in [0, 10000], got {self.temperature}", "temperature")
        if not (0.0 < self.top_p <= 1.0):
            raise bad(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k == 0 or self.top_k < -1:
            raise bad(f"top_k must be -1 (off) or >= 1, got {self.top_k}", "top_k")
        if not (0.0 <= self.min_p <= 1.0):
            raise bad(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if not (MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY):
            raise bad(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, "
                      f"{MAX_REPETITION_PENALTY:g}] (1: off), got {self.repetition_penalty}",
                      "repetition_penalty")
        if not (-2.0 <= self.frequency_penalty <= 2.0):
            raise bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
                      "frequency_penalty")
        if not (-2.0 <= self.presence_penalty <= 2.0):
            raise bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
                      "presence_penalty")
        if self.n < 1:
            raise bad(f"n must be >= 1, got {self.n}", "n")
        if self.seed is not None and not (-(2**63) <= self.seed < 2**64):
            raise bad("seed must fit in 64 bits", "seed")
        stops = self.stop_strings
        if len(stops) > STOP_STRINGS_CEILING:
            raise bad(f"{len(stops)} stop strings; the limit is {STOP_STRINGS_CEILING}", "stop")
        for s in stops:
            if not isinstance(s, str) or s == "":
                raise bad("stop strings must be non-empty strings", "stop")
            if len(s) > STOP_STRING_CHARS_CEILING:
                # the detokenizer keeps every prefix of every stop string: quadratic in length
                raise bad(f"a stop string has {len(s)} characters; the limit is "
                          f"{STOP_STRING_CHARS_CEILING}", "stop")
        for tid in self.stop_token_ids or ():
            if tid < 0 or (vocab_size is not None and tid >= vocab_size):
                raise bad(f"stop_token_ids contains {tid}, outside the vocabulary", "stop_token_ids")
        if self.logit_bias:
            _check_logit_bias(self.logit_bias, vocab_size)
        if self.cache_salt is not None and not self.cache_salt:
            raise bad("cache_salt must be a non-empty string", "cache_salt")
        constraints = [x for x in (self.regex, self.json_schema, self.ebnf, self.structural_tag)
                       if x is not None]
        if len(constraints) > 1:
            raise bad("give at most one of regex, json_schema, ebnf, structural_tag", "regex")


def _check_logit_bias(bias: dict, vocab_size: int | None) -> None:
    """Every bad key at once (not only the first), so a client fixes them in one round."""
    not_ids, outside, bad_values = [], [], []
    for k, v in bias.items():
        try:
            tid = int(k)
        except (TypeError, ValueError):
            not_ids.append(repr(k))
            continue
        if tid < 0 or (vocab_size is not None and tid >= vocab_size):
            outside.append(str(tid))
        if not (-100.0 <= float(v) <= 100.0):
            bad_values.append(f"{k}: {v}")
    problems = []
    if not_ids:
        problems.append(f"key(s) {', '.join(not_ids)} are not token ids")
    if outside:
        problems.append(f"token(s) {', '.join(outside)} are outside the vocabulary"
                        + (f" of {vocab_size}" if vocab_size is not None else ""))
    if bad_values:
        problems.append(f"values must be in [-100, 100] ({', '.join(bad_values)})")
    if problems:
        raise InvalidRequest("logit_bias: " + "; ".join(problems), "logit_bias")
