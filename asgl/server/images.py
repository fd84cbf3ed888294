"""Images in requests: where they come from, checked before anything is decoded.

- OpenAI chat: `{"type": "image_url", "image_url": {"url": ..., "detail": ...}}` parts;
  each becomes the model's image placeholder in the rendered prompt, in place.
- Native `/generate`: `image_data`, one image (or a list) per prompt.

An image is a `data:image/...;base64,` URL, raw base64 (native only, as SGLang takes it),
an http(s) URL (fetched only with `--enable-image-url-fetch`, with a size and a time limit,
private / loopback / link-local addresses refused), or a local file (only inside
`--allowed-local-media-path`, as a `file://` URL or a path). Every other form, and every
broken one, is a 400 naming the request field. Decoding and preprocessing then happen in
the engine, off the event loop (engine/loop/mm_inputs.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import os
import socket
from typing import Any, Optional
from urllib.parse import unquote, urlparse

from asgl.server.errors import bad_request
from asgl.server.state import ServerState

_DETAILS = ("auto", "low", "high")


class ChatImages:
    """Collects a chat request's image (and video) parts while its messages are converted
    to text."""

    def __init__(self, placeholder: str, video_placeholder: Optional[str] = None):
        self.placeholder = placeholder
        self.video_placeholder = video_placeholder
        self.refs: list[tuple[Any, str]] = []  # (url, or a list of frame URLs; where)

    def add_video(self, video_url: Any, where: str) -> str:
        """Record one `video_url` part, {"url": [frame URLs]}; returns its placeholder."""
        if self.video_placeholder is None:
            raise bad_request(f"{where}: this model takes images, not video",
                              f"{where}.video_url")
        frames = video_url.get("url") if isinstance(video_url, dict) else None
        if not isinstance(frames, list) or not frames:
            raise bad_request(f"{where}.video_url.url must be a non-empty list of frames "
                              "(image data URLs); video files are not decoded",
                              f"{where}.video_url")
        self.refs.append((frames, f"{where}.video_url"))
        return self.video_placeholder

    def add(self, image_url: Any, where: str) -> str:
        """Record one `image_url` part; returns the text that stands for it."""
        if isinstance(image_url, str):
            url, detail = image_url, None
        elif isinstance(image_url, dict) and isinstance(image_url.get("url"), str):
            url, detail = image_url["url"], image_url.get("detail")
        else:
            raise bad_request(f"{where}.image_url must be {{\"url\": \"data:image/...;base64,"
                              "...\"}", f"{where}.image_url")
        if detail is not None and detail not in _DETAILS:
            raise bad_request(f"{where}.image_url.detail must be one of {list(_DETAILS)}, got "
                              f"{detail!r}", f"{where}.image_url.detail")
        self.refs.append((url, f"{where}.image_url"))
        return self.placeholder


def chat_images(state: ServerState) -> Optional[ChatImages]:
    """A collector for a vision-language model's chat images; None for text-only models."""
    images = getattr(state.engine, "images", None)
    if images is None:
        return None
    return ChatImages(images.placeholder, images.video_placeholder)


async def load_all(state: ServerState, refs: list[tuple[Any, str]]) -> list[bytes]:
    """The encoded bytes of every image reference, checked (a 400 names the bad one)."""
    limit = state.config.max_images_per_request
    count = sum(len(ref) if isinstance(ref, list) else 1 for ref, _ in refs)
    if count > limit:
        raise bad_request(f"{count} images (video frames count one each) in one request; "
                          f"the limit is {limit} (--max-images-per-request)", refs[-1][1])
    return list(await asyncio.gather(*(load_entry(state, ref, where) for ref, where in refs)))


async def load_entry(state: ServerState, ref: Any, where: str, *,
                     raw_base64: bool = False) -> Any:
    """An image's bytes, or a `Video` of its frames' bytes when `ref` is a list."""
    if isinstance(ref, list):
        from asgl.engine.loop.mm_inputs import Video

        frames = await asyncio.gather(*(load_image(state, f, f"{where}[{k}]",
                                                   raw_base64=raw_base64)
                                        for k, f in enumerate(ref)))
        return Video(tuple(frames))
    return await load_image(state, ref, where, raw_base64=raw_base64)


async def load_image(state: ServerState, ref: Any, where: str, *,
                     raw_base64: bool = False) -> bytes:
    cfg = state.config
    max_bytes = int(cfg.max_image_bytes_mb * 1024 * 1024)
    if not isinstance(ref, str) or not ref:
        raise bad_request(f"{where} must be a non-empty string (a data URL)", where)
    if ref.startswith("data:"):
        return _from_data_url(ref, where, max_bytes)
    scheme = urlparse(ref).scheme.lower() if "://" in ref else ""
    if scheme in ("http", "https"):
        if not cfg.enable_image_url_fetch:
            raise bad_request(f"{where}: this server does not fetch image URLs: send the image "
                              "as a data URL (data:image/png;base64,...), or start the server "
                              "with --enable-image-url-fetch", where)
        return await _fetch(ref, where, max_bytes, cfg.image_fetch_timeout)
    if scheme == "file" or (cfg.allowed_local_media_path and os.path.isabs(ref)):
        return await _local_file(cfg.allowed_local_media_path, ref, where, max_bytes)
    if scheme:
        raise bad_request(f"{where}: unsupported URL scheme {scheme!r} (data URLs are taken"
                          f"{', http(s) too' if cfg.enable_image_url_fetch else ''})", where)
    if raw_base64:  # SGLang's native image_data also takes bare base64
        return _b64(ref, where, max_bytes)
    raise bad_request(f"{where}: an image must be a data URL (data:image/png;base64,...); "
                      "local files need --allowed-local-media-path", where)


def _from_data_url(url: str, where: str, max_bytes: int) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise bad_request(f"{where}: a data URL must look like data:image/png;base64,<data>",
                          where)
    mime = head[5:-len(";base64")].lower()
    if mime and not mime.startswith("image/"):
        raise bad_request(f"{where}: the data URL's type is {mime!r}, not an image", where)
    return _b64(payload, where, max_bytes)


def _b64(payload: str, where: str, max_bytes: int) -> bytes:
    if len(payload) * 3 // 4 > max_bytes:
        raise bad_request(f"{where}: the image is larger than {max_bytes} bytes "
                          "(--max-image-bytes-mb)", where)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where}: the image data is not valid base64", where) from None
    if not data:
        raise bad_request(f"{where}: the image is empty", where)
    return data


async def _local_file(root: Optional[str], ref: str, where: str, max_bytes: int) -> bytes:
    if not root:
        raise bad_request(f"{where}: local files are not served as images unless the server "
                          "is started with --allowed-local-media-path DIR", where)
    path = unquote(urlparse(ref).path) if ref.startswith("file:") else ref
    real, base = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, base]) != base:
        raise bad_request(f"{where}: {path!r} is outside --allowed-local-media-path", where)

    def read() -> bytes:
        with open(real, "rb") as f:
            data = f.read(max_bytes + 1)
        return data

    try:
        data = await asyncio.get_running_loop().run_in_executor(None, read)
    except OSError as e:
        raise bad_request(f"{where}: cannot read {path!r}: {e.strerror}", where) from None
    if len(data) > max_bytes:
        raise bad_request(f"{where}: the image is larger than {max_bytes} bytes "
                          "(--max-image-bytes-mb)", where)
    return data


async def _fetch(url: str, where: str, max_bytes: int, timeout: float) -> bytes:
    import aiohttp

    host = urlparse(url).hostname or ""
    await _check_public(host, where)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            # redirects could lead to a private address: not followed
            async with s.get(url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise bad_request(f"{where}: fetching the image got HTTP {resp.status}",
                                      where)
                data = await resp.content.read(max_bytes + 1)
    except asyncio.TimeoutError:
        raise bad_request(f"{where}: fetching the image took longer than {timeout:g} s "
                          "(--image-fetch-timeout)", where) from None
    except aiohttp.ClientError as e:
        raise bad_request(f"{where}: fetching the image failed: {e}", where) from None
    if len(data) > max_bytes:
        raise bad_request(f"{where}: the image is larger than {max_bytes} bytes "
                          "(--max-image-bytes-mb)", where)
    return data


async def _check_public(host: str, where: str) -> None:
    """Refuse hosts that resolve to private, loopback, link-local or reserved addresses."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None,
                                                             type=socket.SOCK_STREAM)
    except OSError:
        raise bad_request(f"{where}: cannot resolve host {host!r}", where) from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0])
        if not addr.is_global:
            raise bad_request(f"{where}: image URLs may not point at private or local "
                              f"addresses ({host} is {addr})", where)


def _per_prompt_refs(data: Any, name: str, count: int, single: bool,
                     video: bool) -> list[list[tuple[Any, str]]]:
    """(reference, field name) lists per prompt. Images: one prompt takes an image or a
    list; a batch one entry (an image, a list, or null) per prompt. Videos (lists of
    frames): one prompt takes a video or a list of videos; a batch one entry per prompt."""
    if data is None:
        return [[] for _ in range(count)]
    if single:
        per_prompt = [data]
    elif isinstance(data, list) and len(data) == count:
        per_prompt = data
    else:
        raise bad_request(f"{name} of a batch must be a list of {count} entries (one per "
                          "prompt, or null)", name)
    out = []
    for k, entry in enumerate(per_prompt):
        where = name if single else f"{name}[{k}]"
        if entry is None:
            out.append([])
        elif video:  # a video is a list of frames; a list of such lists is several
            if not isinstance(entry, list) or not entry:
                raise bad_request(f"{where} must be a video as a non-empty list of frames "
                                  "(image data URLs), or a list of such videos", where)
            videos = entry if isinstance(entry[0], list) else [entry]
            out.append([(v, f"{where}[{j}]" if len(videos) > 1 else where)
                        for j, v in enumerate(videos)])
        elif isinstance(entry, list):
            out.append([(r, f"{where}[{j}]") for j, r in enumerate(entry)])
        else:
            out.append([(entry, where)])
    return out


async def native_images(state: ServerState, image_data: Any, ids_list: list[list[int]],
                        single: bool, video_data: Any = None
                        ) -> Optional[list[tuple[list[int], Any]]]:
    """`/generate`'s `image_data` (and `video_data`) for each prompt: (expanded ids,
    MMInputs) per prompt, or None without any. Entries are matched to the prompt's
    placeholders in order, images and videos each in their own order."""
    if image_data is None and video_data is None:
        return None
    front = getattr(state.engine, "images", None)
    if front is None:
        name = "image_data" if image_data is not None else "video_data"
        raise bad_request(f"this model takes text only: {name} is not supported", name)
    n = len(ids_list)
    images = _per_prompt_refs(image_data, "image_data", n, single, video=False)
    videos = _per_prompt_refs(video_data, "video_data", n, single, video=True)
    out = []
    limit = state.config.max_images_per_request
    for ids, prompt_images, prompt_videos in zip(ids_list, images, videos):
        count = len(prompt_images) + sum(len(v) for v, _ in prompt_videos)
        if count > limit:
            raise bad_request(f"{count} images (video frames count one each) for one prompt; "
                              f"the limit is {limit} (--max-images-per-request)",
                              "image_data" if image_data is not None else "video_data")
        # in the order of the prompt's placeholders (a mismatch is the engine's 400)
        order = [t for t in ids if t in (front.image_token_id, front.video_token_id)]
        queues = {front.image_token_id: list(prompt_images),
                  front.video_token_id: list(prompt_videos)}
        refs = [queues[t].pop(0) for t in order if queues[t]]
        refs += prompt_images[len([t for t in order if t == front.image_token_id]):] \
            + prompt_videos[len([t for t in order if t == front.video_token_id]):]
        data = await asyncio.gather(*(load_entry(state, r, w, raw_base64=True)
                                      for r, w in refs))
        out.append(await state.engine.prepare_images(ids, list(data), "image_data",
                                                     [w for _, w in refs])
                   if data else (ids, None))
    return out
