"""RuntimeEndpoint: an asgl (or SGLang) server over its native API, `POST /generate`.

Roles are rendered with the served model's chat template, rendered here (the native API
takes text): the template given to the constructor, else one the server reports in
`/get_model_info` (`chat_template`), else the model's own, read from the files the server
names in `/get_model_info` when this machine has them (the embedded model, a local
directory or GGUF file). Without any of these, roles fall back to a plain `ROLE: ` format,
with a warning.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, AsyncIterator, Optional

from asgl.lang.backends.http import HttpClient
from asgl.lang.backends.native import NativeBackend, NativeOutput
from asgl.lang.backends.base import BackendError, StreamEvent
from asgl.lang.chat import ChatTemplate, JinjaChatTemplate, PlainChatTemplate

logger = logging.getLogger(__name__)


class RuntimeEndpoint(NativeBackend):
    def __init__(self, base_url: str, api_key: Optional[str] = None, *,
                 chat_template: Optional[str] = None, tokenizer_path: Optional[str] = None,
                 timeout: float = 600.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = HttpClient(base_url, headers, timeout)
        self.base_url = self.http.base_url
        self._chat_template = chat_template
        self._tokenizer_path = tokenizer_path
        self._model_info: Optional[dict] = None
        self._template_task: Optional[asyncio.Future] = None

    def __repr__(self) -> str:
        return f"RuntimeEndpoint({self.base_url!r})"

    async def get_model_info(self) -> dict:
        if self._model_info is None:
            self._model_info = await self.http.get_json("/get_model_info")
        return self._model_info

    async def image_token(self) -> Optional[str]:
        token = (await self.get_model_info()).get("image_token")
        return token + "\n" if token else None

    async def chat_template(self) -> ChatTemplate:
        if self._template_task is None:  # first caller loads it; concurrent ones wait
            self._template_task = asyncio.ensure_future(self._load_template())
        return await asyncio.shield(self._template_task)

    async def _load_template(self) -> ChatTemplate:
        info = await self.get_model_info()
        # Loading a tokenizer takes a second or more: not on the event loop.
        return await asyncio.get_running_loop().run_in_executor(None, self._resolve_template,
                                                                info)

    def _resolve_template(self, info: dict) -> ChatTemplate:
        template = self._chat_template or info.get("chat_template")
        local = _local_tokenizer(self._tokenizer_path, info)
        if local is not None:
            tokenizer, own = local
            if template or own or getattr(tokenizer, "chat_template", None):
                return JinjaChatTemplate.from_tokenizer(tokenizer, template or own)
        elif template:
            return _template_without_tokenizer(template, info)
        logger.warning("no chat template for %s (model %r): roles are written as 'ROLE: ...'; "
                       "pass RuntimeEndpoint(..., chat_template=...) or tokenizer_path=...",
                       self.base_url, info.get("model_path"))
        return PlainChatTemplate()

    # ------------------------------------------------------------------ requests
    def _body(self, texts: list[str], sampling: dict, images: list) -> dict:
        body: dict[str, Any] = {"text": texts[0] if len(texts) == 1 else texts,
                                "sampling_params": sampling}
        if images:  # SGLang's field; a text-only server refuses it with a 400
            urls = [img.as_url for img in images]
            body["image_data"] = urls if len(texts) == 1 else [urls] * len(texts)
        return body

    async def _call(self, texts: list[str], sampling: dict, *, images: list = (),
                    logprob_start_len: Optional[int] = None, return_logprob: bool = False,
                    top_logprobs_num: int = 0, return_text: bool = False,
                    input_ids: Optional[list[list[int]]] = None) -> list[NativeOutput]:
        if input_ids:
            body: dict[str, Any] = {"input_ids": input_ids if len(input_ids) > 1
                                    else input_ids[0], "sampling_params": sampling}
        else:
            body = self._body(texts, sampling, list(images))
        body.update(_logprob_fields(return_logprob, logprob_start_len, top_logprobs_num,
                                    return_text))
        resp = await self.http.post_json("/generate", body)
        return [_output(item) for item in (resp if isinstance(resp, list) else [resp])]

    async def _stream(self, text: str, sampling: dict, *, images: list = (),
                      return_logprob: bool = False, logprob_start_len: Optional[int] = None,
                      top_logprobs_num: int = 0, return_text: bool = False,
                      ) -> AsyncIterator[StreamEvent]:
        body = {**self._body([text], sampling, list(images)), "stream": True,
                **_logprob_fields(return_logprob, logprob_start_len, top_logprobs_num,
                                  return_text)}
        sent = 0
        async for _, event in self.http.post_sse("/generate", body):
            text_so_far = event["text"]  # the native stream sends the whole text each time
            meta = event.get("meta_info") or {}
            done = meta.get("finish_reason") is not None
            out = {**_meta(meta), **_logprobs(meta)} if done else None
            yield StreamEvent(text_so_far[sent:], out)
            sent = len(text_so_far)

    async def flush_cache(self) -> bool:
        try:
            async with self.http.session().post(self.base_url + "/flush_cache") as resp:
                return resp.status == 200
        except OSError as e:
            raise BackendError(f"{self.base_url}/flush_cache: {e}") from e

    async def get_server_info(self) -> dict:
        return await self.http.get_json("/get_server_info")

    async def aclose(self) -> None:
        await self.http.aclose()


def _meta(meta: dict) -> dict:
    return {k: meta.get(k) for k in ("id", "prompt_tokens", "completion_tokens",
                                     "cached_tokens", "finish_reason")}


_LOGPROB_META = ("output_token_logprobs", "output_top_logprobs", "input_token_logprobs",
                 "input_top_logprobs")


def _logprob_fields(return_logprob: bool, logprob_start_len: Optional[int],
                    top_logprobs_num: int, return_text: bool) -> dict:
    if not return_logprob and logprob_start_len is None:
        return {}
    fields: dict[str, Any] = {"return_logprob": True}
    if logprob_start_len is not None:
        fields["logprob_start_len"] = logprob_start_len
    if top_logprobs_num:
        fields["top_logprobs_num"] = top_logprobs_num
    if return_text:
        fields["return_text_in_logprobs"] = True
    return fields


def _logprobs(meta: dict) -> dict:
    """The logprob entries of a meta_info, as the server sent them (SGLang's format)."""
    return {k: meta[k] for k in _LOGPROB_META if k in meta}


def _output(item: dict) -> NativeOutput:
    meta = item["meta_info"]
    entries = [list(e) + [None] * (3 - len(e)) for e in meta.get("input_token_logprobs") or []]
    return NativeOutput(item["text"], _meta(meta), entries, _logprobs(meta))


def _local_tokenizer(tokenizer_path: Optional[str], info: dict) -> Optional[tuple[Any, Any]]:
    """(tokenizer, chat template) of the served model from files on this machine, or None."""
    try:
        from asgl.config import EngineConfig
        from asgl.engine.loop.tokenizer import load_tokenizer
        from asgl.models import presets
        from asgl.models.loader import ModelLoadError, embedded_model_path, resolve_model
    except ImportError:  # a frontend-only install (no torch, no transformers)
        return None

    try:
        for path in (tokenizer_path, info.get("tokenizer_path")):
            if path and os.path.isdir(os.path.expanduser(path)):
                return load_tokenizer(os.path.expanduser(path)), None
        path = info.get("model_path") or ""
        if os.path.exists(os.path.expanduser(path)):
            cfg = EngineConfig(model_path=path)
        elif path == os.path.basename(embedded_model_path()).removesuffix(".gguf"):
            cfg = EngineConfig()  # the server names the embedded model, which we have too
        elif presets.get_preset(path) is not None:
            cfg = EngineConfig(model_path=path, load_format="dummy")
        else:
            return None
        source = resolve_model(cfg)
        if source.tokenizer_dir is None:
            return None
        return load_tokenizer(source), source.chat_template
    except (ModelLoadError, OSError, ValueError) as e:
        logger.warning("cannot load the served model's tokenizer here: %s", e)
        return None


def _template_without_tokenizer(template: str, info: dict) -> ChatTemplate:
    special = {k: info.get(k) or "" for k in ("bos_token", "eos_token")}
    try:
        from transformers.utils.chat_template_utils import render_jinja_template

        from asgl.engine.loop.tokenizer import BUILTIN_CHAT_TEMPLATES
    except ImportError:  # a frontend-only install: the server's template text, with jinja2
        return JinjaChatTemplate(_jinja_render(template, special), "server template")
    text = BUILTIN_CHAT_TEMPLATES.get(template, template)

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        rendered, _ = render_jinja_template([messages], chat_template=text,
                                            add_generation_prompt=add_generation_prompt,
                                            **special)
        return rendered[0]
    return JinjaChatTemplate(render, "server template")


def _jinja_render(text: str, special: dict) -> Any:
    """Render an HF chat template with jinja2 alone, as transformers sets it up (trimmed
    blocks, loop controls, `raise_exception`), for installs without transformers."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(text)

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **special)
    return render
