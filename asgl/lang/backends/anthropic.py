"""Anthropic: Claude models over the Messages API (`POST /v1/messages`), with aiohttp.

System turns go to the top-level `system` field; an assistant turn the program began
writing is sent last, as a prefill the model continues. The API refuses a prefill that
ends in whitespace and stop sequences that are only whitespace, so those are handled here:
the whitespace is trimmed off the prefill (and not repeated from the answer), and every
stop string is also applied to the text as it arrives. `select` falls back to a
constrained gen (the API has no prompt log-probabilities and no regex).
"""

from __future__ import annotations

import os
from typing import Any, AsyncIterator, Optional

from asgl.lang.backends.base import Backend, BackendError, GenResult, Prompt, StreamEvent
from asgl.lang.backends.http import HttpClient
from asgl.lang.sampling import stop_list, truncate_at_stop

API_VERSION = "2023-06-01"
_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k"}


class Anthropic(Backend):
    supports_regex = False

    def __init__(self, model_name: str, api_key: Optional[str] = None,
                 base_url: Optional[str] = None, *, timeout: float = 600.0):
        self.model_name = model_name
        api_key = api_key or os.environ.get("ANTHROPIC_API_KEY")
        base_url = base_url or os.environ.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com"
        headers = {"anthropic-version": API_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        self.http = HttpClient(base_url, headers, timeout)

    def __repr__(self) -> str:
        return f"Anthropic({self.model_name!r})"

    def build_request(self, prompt: Prompt, params: dict) -> tuple[dict, str]:
        """(the request body, whitespace trimmed off the end of a prefill)."""
        if "regex" in params or "json_schema" in params:
            raise BackendError("the Anthropic API has no regex / json_schema constraints",
                               param="regex" if "regex" in params else "json_schema")
        if "stop_regex" in params:
            raise BackendError("the Anthropic API has no stop_regex", param="stop_regex")
        if params.get("return_logprob") or params.get("logprob_start_len") is not None:
            raise BackendError("gen(return_logprob=True): the Anthropic API returns no "
                               "logprobs", param="return_logprob")
        system, messages, trimmed = _messages(prompt)
        body: dict[str, Any] = {"model": self.model_name,
                                "max_tokens": params["max_new_tokens"], "messages": messages}
        if system:
            body["system"] = system
        for ours, theirs in _SAMPLING.items():
            if ours in params and not (ours == "top_k" and params[ours] < 0):
                body[theirs] = params[ours]
        sendable = [s for s in stop_list(params) if s.strip()]
        if sendable:
            body["stop_sequences"] = sendable
        return body, trimmed

    async def generate(self, prompt: Prompt, params: dict) -> GenResult:
        body, trimmed = self.build_request(prompt, params)
        resp = await self.http.post_json("/v1/messages", body)
        out = _Output(trimmed, stop_list(params))
        text = out.feed("".join(b.get("text", "") for b in resp.get("content", [])
                                if b.get("type") == "text")) + out.finish()
        return GenResult(text, _meta(resp.get("id"), resp.get("usage") or {},
                                     out.reason or resp.get("stop_reason")))

    async def stream(self, prompt: Prompt, params: dict) -> AsyncIterator[StreamEvent]:
        body, trimmed = self.build_request(prompt, params)
        out = _Output(trimmed, stop_list(params))
        rid, usage, reason = None, {}, None
        async for name, event in self.http.post_sse("/v1/messages", {**body, "stream": True}):
            kind = event.get("type", name)
            if kind == "message_start":
                rid = event["message"].get("id")
                usage.update(event["message"].get("usage") or {})
            elif kind == "content_block_delta" and event["delta"].get("type") == "text_delta":
                text = out.feed(event["delta"]["text"])
                if text:
                    yield StreamEvent(text)
                if out.reason:  # a stop string the API could not be told about
                    break
            elif kind == "message_delta":
                reason = event["delta"].get("stop_reason") or reason
                usage.update(event.get("usage") or {})
        yield StreamEvent(out.finish(), _meta(rid, usage, out.reason or reason))

    async def aclose(self) -> None:
        await self.http.aclose()


class _Output:
    """The answer as the program sees it: without the whitespace the prefill lost, cut at
    the first stop string. Text that may begin a stop string is held back until known."""

    def __init__(self, trimmed: str, stops: list[str]):
        self._trimmed = trimmed
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._raw = ""
        self._sent = 0
        self.reason: Optional[str] = None

    def _text(self) -> str:
        raw, trim = self._raw, self._trimmed
        n = 0
        while n < min(len(raw), len(trim)) and raw[n] == trim[n]:
            n += 1
        return raw[n:]

    def feed(self, delta: str) -> str:
        if self.reason:
            return ""
        self._raw += delta
        text = self._text()
        cut, hit = truncate_at_stop(text, self._stops)
        if hit is not None:
            self.reason = "stop_sequence"
            end = len(cut)
        elif len(self._raw) < len(self._trimmed):
            end = self._sent  # still inside the whitespace the prefill lost
        else:
            end = max(self._sent, len(text) - self._hold)
        piece, self._sent = text[self._sent:end], end
        return piece

    def finish(self) -> str:
        if self.reason:
            return ""
        text = self._text()
        piece, self._sent = text[self._sent:], len(text)
        return piece


def _messages(prompt: Prompt) -> tuple[str, list[dict], str]:
    turns = list(prompt.messages)
    if prompt.open_role is not None and (prompt.open_content or prompt.open_role != "assistant"):
        turns.append({"role": prompt.open_role, "content": prompt.open_content})
    if not turns:
        turns = [{"role": "user", "content": prompt.text}]
    system = "\n\n".join(_plain(t["content"]) for t in turns if t["role"] == "system")
    messages = [{"role": t["role"], "content": _blocks(t["content"])}
                for t in turns if t["role"] != "system"]
    trimmed = ""
    if messages and messages[-1]["role"] == "assistant":
        last = messages[-1]
        text = _plain(last["content"])
        kept = text.rstrip()
        trimmed = text[len(kept):]
        last["content"] = kept
    return system, messages, trimmed


def _plain(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def _blocks(content: Any) -> Any:
    """OpenAI-style content parts as Anthropic content blocks."""
    if isinstance(content, str):
        return content
    blocks = []
    for part in content:
        if part.get("type") == "text":
            blocks.append({"type": "text", "text": part["text"]})
        elif part.get("type") == "image_url":
            url = part["image_url"]["url"]
            if url.startswith("data:"):
                header, _, data = url.partition(",")
                source = {"type": "base64", "media_type": header[5:].split(";")[0],
                          "data": data}
            else:
                source = {"type": "url", "url": url}
            blocks.append({"type": "image", "source": source})
    return blocks


def _meta(rid: Optional[str], usage: dict, reason: Optional[str]) -> dict:
    return {"id": rid, "prompt_tokens": usage.get("input_tokens"),
            "completion_tokens": usage.get("output_tokens"),
            "cached_tokens": usage.get("cache_read_input_tokens") or 0,
            "finish_reason": reason}
