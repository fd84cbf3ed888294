"""VertexAI: Gemini models through the `google-genai` client (`pip install google-genai`),
on Vertex AI (a project and location with Application Default Credentials, or an API key in
Vertex's express mode) or, with `vertexai=False`, the Gemini Developer API.

The conversation is sent as Gemini contents: system turns become the `system_instruction`,
assistant turns the `model` role, image parts inline bytes (data URLs) or file URIs. Gemini
answers in a new model turn, so it cannot continue an assistant turn the program already
began writing (that raises, as the OpenAI chat backend does). `select` falls back to a
short greedy gen matched to the closest choice (Gemini returns no prompt log-probabilities
and takes no regex). Stop strings go to the API (at most 5 there) and are also applied here.
"""

from __future__ import annotations

import asyncio
import base64
import mimetypes
import os
from typing import Any, AsyncIterator, Optional

from asgl.lang import event_loop
from asgl.lang.backends.base import Backend, BackendError, GenResult, Prompt, StreamEvent
from asgl.lang.backends.stops import StopFilter
from asgl.lang.sampling import stop_list

MAX_STOP_SEQUENCES = 5  # the API's limit; further stop strings are applied here only


class VertexAI(Backend):
    supports_regex = False

    def __init__(self, model_name: str, project: Optional[str] = None,
                 location: Optional[str] = None, api_key: Optional[str] = None,
                 base_url: Optional[str] = None, *, vertexai: bool = True,
                 safety_settings: Optional[list] = None, **client_options: Any):
        self.model_name = model_name
        self.vertexai = vertexai
        # SGLang's VertexAI reads GCP_PROJECT_ID / GCP_LOCATION; google-genai its own names
        self.project = project or os.environ.get("GOOGLE_CLOUD_PROJECT") or \
            os.environ.get("GCP_PROJECT_ID")
        self.location = location or os.environ.get("GOOGLE_CLOUD_LOCATION") or \
            os.environ.get("GCP_LOCATION") or "us-central1"
        self.api_key = api_key or os.environ.get("GOOGLE_API_KEY")
        self.base_url = base_url
        self.safety_settings = safety_settings
        self._client_options = client_options
        self._clients: dict[asyncio.AbstractEventLoop, Any] = {}

    def __repr__(self) -> str:
        return f"VertexAI({self.model_name!r})"

    def _client(self) -> Any:
        try:
            from google import genai
            from google.genai import types
        except ImportError:
            raise BackendError("VertexAI needs the google-genai package: pip install "
                               "'asgl[vertexai]'") from None
        loop = asyncio.get_running_loop()  # its HTTP pool belongs to one loop
        if loop not in self._clients:
            options = dict(self._client_options)
            if self.base_url:
                options["http_options"] = types.HttpOptions(base_url=self.base_url)
            if self.api_key:  # express mode on Vertex, or the Gemini Developer API
                client = genai.Client(vertexai=self.vertexai, api_key=self.api_key, **options)
            elif self.vertexai:
                if not self.project:
                    raise BackendError("VertexAI needs a project (project= or "
                                       "GOOGLE_CLOUD_PROJECT / GCP_PROJECT_ID) or an api_key",
                                       param="project")
                client = genai.Client(vertexai=True, project=self.project,
                                      location=self.location, **options)
            else:
                raise BackendError("the Gemini API needs an api_key (or GOOGLE_API_KEY)",
                                   param="api_key")
            self._clients[loop] = client
            event_loop.close_at_exit(self)
        return self._clients[loop]

    async def aclose(self) -> None:
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aio.aclose()

    def build_request(self, prompt: Prompt, params: dict) -> tuple[list, Any]:
        """(contents, GenerateContentConfig) for google-genai."""
        from google.genai import types

        for name in ("regex", "json_schema", "ebnf"):
            if name in params:
                raise BackendError(f"gen({name}=...): the Gemini API takes no such "
                                   "constraint", status=400, param=name)
        if params.get("return_logprob") or params.get("logprob_start_len") is not None:
            raise BackendError("gen(return_logprob=True): the VertexAI backend returns no "
                               "logprobs", param="return_logprob")
        system, contents = _contents(prompt)
        config: dict[str, Any] = {"max_output_tokens": params["max_new_tokens"]}
        for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"),
                             ("presence_penalty", "presence_penalty"),
                             ("frequency_penalty", "frequency_penalty"), ("seed", "seed")):
            if params.get(ours) is not None:
                config[theirs] = params[ours]
        if params.get("top_k") is not None and params["top_k"] > 0:
            config["top_k"] = params["top_k"]
        stops = stop_list(params)[:MAX_STOP_SEQUENCES]
        if stops:
            config["stop_sequences"] = stops
        if system:
            config["system_instruction"] = system
        if self.safety_settings:
            config["safety_settings"] = self.safety_settings
        return contents, types.GenerateContentConfig(**config)

    async def generate(self, prompt: Prompt, params: dict) -> GenResult:
        contents, config = self.build_request(prompt, params)
        resp = await _call(self._client().aio.models.generate_content(
            model=self.model_name, contents=contents, config=config))
        stops = StopFilter(stop_list(params))
        text = stops.feed(_text(resp)) + stops.finish()
        return GenResult(text, _meta(resp, "stop" if stops.hit else None))

    async def stream(self, prompt: Prompt, params: dict) -> AsyncIterator[StreamEvent]:
        contents, config = self.build_request(prompt, params)
        stops, last = StopFilter(stop_list(params)), None
        chunks = await _call(self._client().aio.models.generate_content_stream(
            model=self.model_name, contents=contents, config=config))
        async for chunk in chunks:
            last = chunk
            text = stops.feed(_text(chunk))
            if text:
                yield StreamEvent(text)
            if stops.hit:
                break
        yield StreamEvent(stops.finish(), _meta(last, "stop" if stops.hit else None))


def _contents(prompt: Prompt) -> tuple[str, list]:
    from google.genai import types

    turns = list(prompt.messages)
    if prompt.open_role == "assistant" and prompt.open_content:
        raise BackendError(
            "the Gemini API cannot continue an assistant turn that the program began "
            f"writing ({str(prompt.open_content)[:40]!r}): gen right after "
            "assistant_begin(), or use a backend that continues text")
    if prompt.open_role not in (None, "assistant") and prompt.open_content:
        turns.append({"role": prompt.open_role, "content": prompt.open_content})
    if not turns:
        turns = [{"role": "user", "content": prompt.text}]
    system = "\n\n".join(_plain(t["content"]) for t in turns if t["role"] == "system")
    contents = [types.Content(role="model" if t["role"] == "assistant" else "user",
                              parts=_parts(t["content"]))
                for t in turns if t["role"] != "system"]
    return system, contents


def _plain(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def _parts(content: Any) -> list:
    """OpenAI-style content parts as Gemini parts."""
    from google.genai import types

    if isinstance(content, str):
        return [types.Part(text=content)]
    parts = []
    for part in content:
        if part.get("type") == "text":
            parts.append(types.Part(text=part["text"]))
        elif part.get("type") == "image_url":
            url = part["image_url"]["url"]
            if url.startswith("data:"):
                header, _, data = url.partition(",")
                parts.append(types.Part.from_bytes(data=base64.b64decode(data),
                                                   mime_type=header[5:].split(";")[0]))
            else:
                mime = mimetypes.guess_type(url)[0] or "image/jpeg"
                parts.append(types.Part.from_uri(file_uri=url, mime_type=mime))
    return parts


def _text(resp: Any) -> str:
    out = []
    for candidate in (getattr(resp, "candidates", None) or [])[:1]:
        content = getattr(candidate, "content", None)
        for part in getattr(content, "parts", None) or []:
            if getattr(part, "text", None) and not getattr(part, "thought", False):
                out.append(part.text)
    return "".join(out)


def _meta(resp: Any, reason: Optional[str]) -> dict:
    usage = getattr(resp, "usage_metadata", None)
    candidates = getattr(resp, "candidates", None) or []
    api_reason = getattr(candidates[0], "finish_reason", None) if candidates else None
    if api_reason is not None:
        api_reason = getattr(api_reason, "value", str(api_reason)).lower()
    return {"id": getattr(resp, "response_id", None),
            "prompt_tokens": getattr(usage, "prompt_token_count", None),
            "completion_tokens": getattr(usage, "candidates_token_count", None),
            "cached_tokens": getattr(usage, "cached_content_token_count", None) or 0,
            "finish_reason": reason or api_reason}


async def _call(awaitable: Any) -> Any:
    from google.genai import errors

    try:
        return await awaitable
    except errors.APIError as e:
        raise BackendError(f"Gemini API: HTTP {e.code}: {e.message}", status=e.code) from e
