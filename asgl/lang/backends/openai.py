"""OpenAI: any OpenAI-compatible API (OpenAI itself, asgl's `/v1`, vLLM, SGLang).

A state that uses roles is sent as chat messages (`/chat/completions`); one without roles
as a text prompt (`/completions`); `is_chat_model=` forces either. The chat API answers in
a new assistant turn, so it cannot continue an assistant turn the program already began
writing (`assistant_begin(); s += "Answer: " + gen()`): that raises, as in SGLang.

Sampling parameters outside OpenAI's API (top_k, min_p, regex, ...) go in the request body
as extra fields, which asgl, vLLM and SGLang read. `select` cannot score choices here (no
prompt log-probabilities in the chat API): it falls back to a constrained gen (base.py).
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any, AsyncIterator, Optional

from asgl.lang import event_loop
from asgl.lang.backends.base import Backend, BackendError, GenResult, Prompt, StreamEvent

# our names -> OpenAI's, for the parameters its API defines
_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "stop": "stop", "temperature": "temperature",
                 "top_p": "top_p", "frequency_penalty": "frequency_penalty",
                 "presence_penalty": "presence_penalty", "seed": "seed"}
# the rest, as vLLM / SGLang / asgl name them
_EXTRA_NAMES = {"min_new_tokens": "min_tokens", "top_k": "top_k", "min_p": "min_p",
                "repetition_penalty": "repetition_penalty", "ignore_eos": "ignore_eos",
                "stop_token_ids": "stop_token_ids", "regex": "regex",
                "stop_regex": "stop_regex"}  # SGLang's and asgl's OpenAI routes take it


class OpenAI(Backend):
    def __init__(self, model_name: str, base_url: Optional[str] = None,
                 api_key: Optional[str] = None, *, is_chat_model: Optional[bool] = None,
                 supports_regex: Optional[bool] = None, **client_options: Any):
        self.model_name = model_name
        self.base_url = base_url
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or (
            "EMPTY" if base_url else None)
        self.is_chat_model = is_chat_model
        self.supports_regex = supports_regex
        self._client_options = client_options
        self._clients: dict[asyncio.AbstractEventLoop, Any] = {}

    def __repr__(self) -> str:
        return f"OpenAI({self.model_name!r}, base_url={self.base_url!r})"

    def _client(self) -> Any:
        import openai  # the SDK is only needed by programs that use this backend

        loop = asyncio.get_running_loop()  # its HTTP pool belongs to one loop
        if loop not in self._clients:
            self._clients[loop] = openai.AsyncOpenAI(api_key=self.api_key, base_url=self.base_url,
                                                     **self._client_options)
            event_loop.close_at_exit(self)
        return self._clients[loop]

    async def aclose(self) -> None:
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()

    def chat_speculation(self, prompt: Prompt) -> bool:
        """Whether `num_api_spec_tokens` generates an assistant turn in one chat call."""
        return self._use_chat(prompt)

    def _use_chat(self, prompt: Prompt) -> bool:
        return self.is_chat_model if self.is_chat_model is not None else prompt.has_roles

    def _request(self, prompt: Prompt, params: dict) -> tuple[Any, dict]:
        """(the SDK method, its arguments)."""
        args: dict[str, Any] = {"model": self.model_name}
        extra: dict[str, Any] = {}
        for key, value in params.items():
            if key in _OPENAI_NAMES:
                args[_OPENAI_NAMES[key]] = value
            elif key in _EXTRA_NAMES:
                extra[_EXTRA_NAMES[key]] = value
        if params.get("logprob_start_len") is not None:
            raise BackendError(f"gen(logprob_start_len=...): {self!r} returns no prompt "
                               f"(input) logprobs; use a runtime backend",
                               param="logprob_start_len")
        top = params.get("top_logprobs_num") or 0
        client = self._client()
        chat = self._use_chat(prompt)
        if params.get("return_logprob"):
            if chat:
                args["logprobs"] = True
                if top:
                    args["top_logprobs"] = top
            else:
                args["logprobs"] = top
        if chat:
            args["messages"] = chat_messages(prompt)
            if "json_schema" in params:
                args["response_format"] = {"type": "json_schema", "json_schema": {
                    "name": "output", "schema": json.loads(params["json_schema"])}}
            method = client.chat.completions.create
        else:
            if prompt.images:
                raise BackendError("images need the chat API: put them in a user turn")
            if "json_schema" in params:
                extra["json_schema"] = params["json_schema"]
            args["prompt"] = prompt.text
            method = client.completions.create
        if extra:
            args["extra_body"] = extra
        return method, args

    async def generate(self, prompt: Prompt, params: dict) -> GenResult:
        method, args = self._request(prompt, params)
        resp = await _call(method, args)
        choice = resp.choices[0]
        text = choice.message.content if hasattr(choice, "message") else choice.text
        meta = _meta(resp.id, resp.usage, choice.finish_reason)
        if params.get("return_logprob"):
            meta.update(_logprob_meta([choice], params))
        return GenResult(text or "", meta)

    async def stream(self, prompt: Prompt, params: dict) -> AsyncIterator[StreamEvent]:
        method, args = self._request(prompt, params)
        args.update(stream=True, stream_options={"include_usage": True})
        rid, reason, usage, seen = None, None, None, []
        async for chunk in await _call(method, args):
            rid, usage = chunk.id, chunk.usage or usage
            for choice in chunk.choices:
                delta = getattr(choice, "delta", None)
                text = (delta.content if delta is not None else choice.text) or ""
                reason = choice.finish_reason or reason
                seen.append(choice)
                if text:
                    yield StreamEvent(text)
        meta = _meta(rid, usage, reason)
        if params.get("return_logprob"):
            meta.update(_logprob_meta(seen, params))
        yield StreamEvent("", meta)


def _logprob_meta(choices: list, params: dict) -> dict:
    """SGLang's logprob entries from OpenAI's: [logprob, None (no token ids in this API),
    token text]; chat (`logprobs.content`) or completions (`tokens`/`token_logprobs`)."""
    tokens, tops = [], []
    for choice in choices:
        lp = getattr(choice, "logprobs", None)
        if lp is None:
            continue
        if getattr(lp, "content", None) is not None:
            for item in lp.content:
                tokens.append([item.logprob, None, item.token])
                tops.append([[t.logprob, None, t.token] for t in item.top_logprobs or []])
        elif getattr(lp, "tokens", None) is not None:
            for i, token in enumerate(lp.tokens):
                tokens.append([lp.token_logprobs[i], None, token])
                row = (lp.top_logprobs or [None] * len(lp.tokens))[i] or {}
                tops.append([[v, None, k] for k, v in row.items()])
    return {"output_token_logprobs": tokens,
            "output_top_logprobs": tops if params.get("top_logprobs_num") else None,
            "input_token_logprobs": []}


def chat_messages(prompt: Prompt) -> list[dict]:
    messages = list(prompt.messages)
    if prompt.open_role is not None:
        if prompt.open_role == "assistant":
            if prompt.open_content:
                raise BackendError(
                    "the OpenAI chat API cannot continue an assistant turn that the program "
                    f"began writing ({str(prompt.open_content)[:40]!r}): gen right after "
                    "assistant_begin(), or use a backend that continues text")
        elif prompt.open_content:
            messages.append({"role": prompt.open_role, "content": prompt.open_content})
    elif not messages:
        messages = [{"role": "user", "content": prompt.text}]
    return messages


async def _call(method: Any, args: dict) -> Any:
    import openai

    try:
        return await method(**args)
    except openai.APIStatusError as e:
        err = e.body if isinstance(e.body, dict) else {}  # the SDK unwraps {"error": ...}
        if isinstance(err.get("error"), dict):
            err = err["error"]
        message = err.get("message") or str(e)
        raise BackendError(f"OpenAI API at {e.request.url}: HTTP {e.status_code}: {message}",
                           status=e.status_code, param=err.get("param")) from e


def _meta(rid: Optional[str], usage: Any, reason: Optional[str]) -> dict:
    meta: dict[str, Any] = {"id": rid, "finish_reason": reason}
    if usage is not None:
        details = getattr(usage, "prompt_tokens_details", None)
        meta.update(prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    cached_tokens=getattr(details, "cached_tokens", None) or 0)
    return meta
