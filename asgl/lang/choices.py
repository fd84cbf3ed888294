"""How `select` picks a choice from the choices' prompt log-probabilities (SGLang's
`choices_method=`): the three methods SGLang defines, under its names.

Each method gets, per choice, the log-probabilities of the tokens that spell it after the
prompt, as `[logprob, token_id, token_text]` entries (`input_token_logprobs`), their means
(`normalized_prompt_logprobs`), and, for `unconditional_likelihood_normalized`, the same
tokens' log-probabilities with no prompt before them (`unconditional_token_logprobs`).
It returns the index of the choice and what to report in `get_meta_info`.
"""

from __future__ import annotations

import math
from typing import Any, Optional


def _first_best(values: list[float]) -> int:
    # ties go to the earlier choice, as in SGLang
    return max(range(len(values)), key=lambda i: values[i])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else -math.inf


class ChoicesMethod:
    name = "choices_method"
    needs_unconditional = False  # ask the runtime for the choices' logprobs without a prompt

    def __repr__(self) -> str:
        return self.name

    def decide(self, *, choices: list[str], normalized_prompt_logprobs: list[float],
               input_token_logprobs: list[list], output_token_logprobs: list[list],
               unconditional_token_logprobs: Optional[list[list]] = None,
               ) -> tuple[int, dict[str, Any]]:
        raise NotImplementedError

    # SGLang calls a method as a function
    def __call__(self, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        return self.decide(**kwargs)

    @staticmethod
    def _meta(normalized: list[float], inputs: list[list], outputs: list[list]) -> dict:
        return {"normalized_prompt_logprobs": normalized, "input_token_logprobs": inputs,
                "output_token_logprobs": outputs}


class TokenLengthNormalized(ChoicesMethod):
    """The highest mean log-probability per token (the default)."""
    name = "token_length_normalized"

    def decide(self, *, choices, normalized_prompt_logprobs, input_token_logprobs,
               output_token_logprobs, unconditional_token_logprobs=None):
        return (_first_best(normalized_prompt_logprobs),
                self._meta(normalized_prompt_logprobs, input_token_logprobs,
                           output_token_logprobs))


class GreedyTokenSelection(ChoicesMethod):
    """Compare the choices token by token: keep those with the best log-probability at the
    first position, then the next, until one is left. A shorter choice is padded with its
    own mean, so a choice that is a prefix of another can still win."""
    name = "greedy_token_selection"

    def decide(self, *, choices, normalized_prompt_logprobs, input_token_logprobs,
               output_token_logprobs, unconditional_token_logprobs=None):
        width = max(len(row) for row in input_token_logprobs)
        matrix = []
        for row in input_token_logprobs:
            lps = [entry[0] for entry in row]
            fill = _mean(lps) if lps else math.nan
            matrix.append(lps + [fill] * (width - len(lps)))
        alive = list(range(len(choices)))
        for col in range(width):
            best = max(matrix[i][col] for i in alive)
            alive = [i for i in alive if matrix[i][col] == best]
            if len(alive) == 1:
                break
        meta = self._meta(normalized_prompt_logprobs, input_token_logprobs,
                          output_token_logprobs)
        meta["greedy_logprob_matrix"] = matrix
        return alive[0], meta


class UnconditionalLikelihoodNormalized(ChoicesMethod):
    """The highest mean of (log p(token | prompt) - log p(token | nothing)): favours the
    choice the prompt makes likelier, not the one that is likely anyway. The first token
    has no unconditional logprob (nothing before it): it counts as 0."""
    name = "unconditional_likelihood_normalized"
    needs_unconditional = True

    def decide(self, *, choices, normalized_prompt_logprobs, input_token_logprobs,
               output_token_logprobs, unconditional_token_logprobs=None):
        if unconditional_token_logprobs is None:
            raise ValueError(f"{self.name} needs the choices' unconditional token logprobs")
        scores = []
        for cond, uncond in zip(input_token_logprobs, unconditional_token_logprobs):
            if len(cond) != len(uncond):
                raise ValueError("conditional and unconditional logprobs of a choice differ "
                                 f"in length ({len(cond)} vs {len(uncond)})")
            base = [entry[0] for entry in uncond]
            if base:
                base[0] = base[0] or 0.0
            scores.append(_mean([c[0] - b for c, b in zip(cond, base)]))
        meta = self._meta(normalized_prompt_logprobs, input_token_logprobs,
                          output_token_logprobs)
        meta.update(unconditional_token_logprobs=unconditional_token_logprobs,
                    normalized_unconditional_prompt_logprobs=scores)
        return _first_best(scores), meta


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()

_BY_NAME = {m.name: m for m in (token_length_normalized, greedy_token_selection,
                                unconditional_likelihood_normalized)}


def resolve(method: Any) -> Optional[ChoicesMethod]:
    """A method object from an object or its name; None stays None (the default)."""
    if method is None or isinstance(method, ChoicesMethod):
        return method
    if isinstance(method, str) and method in _BY_NAME:
        return _BY_NAME[method]
    name = getattr(type(method), "__name__", "")  # SGLang's own method objects
    for ours in _BY_NAME.values():
        if name.lower() == ours.name.replace("_", ""):
            return ours
    raise ValueError(f"unknown choices_method {method!r}: use one of {', '.join(_BY_NAME)}")
