"""LiteLLM: any of the providers LiteLLM speaks to (`pip install litellm`), through its
`acompletion` (OpenAI-shaped chat requests and answers), with the model named as LiteLLM
names it: "gpt-4o-mini", "anthropic/claude-3-5-haiku-latest", "hosted_vllm/my-model", ...

Every state is sent as chat messages (OpenAI content parts, images included, which
LiteLLM translates per provider). As with the OpenAI chat backend, an assistant turn the
program already began writing cannot be continued, and `select` falls back to a short
greedy gen matched to the closest choice.
"""

from __future__ import annotations

import os
from typing import Any, AsyncIterator, Optional

from asgl.lang.backends.base import Backend, BackendError, GenResult, Prompt, StreamEvent
from asgl.lang.backends.openai import chat_messages
from asgl.lang.backends.stops import StopFilter
from asgl.lang.sampling import stop_list

_NAMES = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
          "stop": "stop", "presence_penalty": "presence_penalty",
          "frequency_penalty": "frequency_penalty", "seed": "seed"}


class LiteLLM(Backend):
    supports_regex = False

    def __init__(self, model_name: str, api_base: Optional[str] = None,
                 api_key: Optional[str] = None, **completion_options: Any):
        self.model_name = model_name
        self.api_base = api_base
        self.api_key = api_key
        self.completion_options = completion_options  # passed to every acompletion call

    def __repr__(self) -> str:
        return f"LiteLLM({self.model_name!r})"

    def build_request(self, prompt: Prompt, params: dict) -> dict:
        for name in ("regex", "json_schema", "ebnf"):
            if name in params:
                raise BackendError(f"gen({name}=...): the LiteLLM backend sends no such "
                                   "constraint", status=400, param=name)
        if params.get("return_logprob") or params.get("logprob_start_len") is not None:
            raise BackendError("gen(return_logprob=True): the LiteLLM backend returns no "
                               "logprobs", param="return_logprob")
        args: dict[str, Any] = {"model": self.model_name, "messages": chat_messages(prompt),
                                **self.completion_options}
        for ours, theirs in _NAMES.items():
            if params.get(ours) is not None:
                args[theirs] = params[ours]
        if params.get("top_k") is not None and params["top_k"] > 0:
            args["top_k"] = params["top_k"]
        if self.api_base:
            args["api_base"] = self.api_base
        if self.api_key:
            args["api_key"] = self.api_key
        return args

    async def generate(self, prompt: Prompt, params: dict) -> GenResult:
        resp = await _call(self.build_request(prompt, params))
        choice = resp.choices[0]
        stops = StopFilter(stop_list(params))  # not every provider applies them all
        text = stops.feed(choice.message.content or "") + stops.finish()
        return GenResult(text, _meta(resp.id, getattr(resp, "usage", None),
                                     "stop" if stops.hit else choice.finish_reason))

    async def stream(self, prompt: Prompt, params: dict) -> AsyncIterator[StreamEvent]:
        args = self.build_request(prompt, params)
        args.update(stream=True, stream_options={"include_usage": True})
        rid, reason, usage = None, None, None
        stops = StopFilter(stop_list(params))
        async for chunk in await _call(args):
            rid = chunk.id or rid
            usage = getattr(chunk, "usage", None) or usage
            for choice in chunk.choices:
                reason = choice.finish_reason or reason
                text = stops.feed(getattr(choice.delta, "content", None) or "")
                if text:
                    yield StreamEvent(text)
            if stops.hit:
                break
        yield StreamEvent(stops.finish(), _meta(rid, usage, "stop" if stops.hit else reason))


def _litellm() -> Any:
    # Without this, importing litellm fetches its price table from GitHub (retrying for
    # seconds where there is no network); the copy inside the package serves the same.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        import litellm
    except ImportError:
        raise BackendError("LiteLLM needs the litellm package: pip install "
                           "'asgl[litellm]'") from None
    return litellm


async def _call(args: dict) -> Any:
    litellm = _litellm()
    import openai  # LiteLLM's mapped errors derive from the OpenAI SDK's

    try:
        return await litellm.acompletion(**args)
    except openai.OpenAIError as e:
        status = getattr(e, "status_code", None)
        raise BackendError(f"LiteLLM ({args['model']}): {e}", status=status) from e


def _meta(rid: Optional[str], usage: Any, reason: Optional[str]) -> dict:
    meta: dict[str, Any] = {"id": rid, "finish_reason": reason}
    if usage is not None:
        meta.update(prompt_tokens=getattr(usage, "prompt_tokens", None),
                    completion_tokens=getattr(usage, "completion_tokens", None), cached_tokens=0)
    return meta
