"""Images given to `image(...)`: a file path, an http(s) or data URL, or raw bytes.

Files are read when the expression is built, so a missing file fails in the program line
that names it. Backends take what they need: a URL, or base64 data with a media type.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from typing import Optional, Union

# Leading bytes of the formats vision APIs accept.
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
          (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"))


@dataclass(frozen=True)
class ImageData:
    url: Optional[str] = None  # http(s) URL, when given as one
    data: Optional[bytes] = None  # raw bytes otherwise
    media_type: str = "image/png"

    @property
    def base64(self) -> str:
        if self.data is None:
            raise ValueError(f"image {self.url} is a URL: it has no inline data")
        return base64.b64encode(self.data).decode("ascii")

    @property
    def as_url(self) -> str:
        """An http(s) URL or a data URL: what OpenAI's `image_url` takes."""
        return self.url if self.url is not None else f"data:{self.media_type};base64,{self.base64}"

    def openai_part(self) -> dict:
        return {"type": "image_url", "image_url": {"url": self.as_url}}

    def __repr__(self) -> str:
        what = self.url if self.url is not None else f"{len(self.data or b'')} bytes"
        return f"ImageData({what}, {self.media_type})"


def load_image(source: Union[str, bytes, bytearray, os.PathLike]) -> ImageData:
    if isinstance(source, (bytes, bytearray)):
        return ImageData(data=bytes(source), media_type=_media_type(bytes(source)))
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise TypeError(f"image() takes a path, a URL or bytes, not {type(source).__name__}")
    if source.startswith(("http://", "https://")):
        return ImageData(url=source, media_type=_guess_from_name(source))
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        media_type = header[5:].split(";")[0] or "image/png"
        return ImageData(data=base64.b64decode(payload), media_type=media_type)
    path = os.path.expanduser(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {source}")
    with open(path, "rb") as f:
        data = f.read()
    return ImageData(data=data, media_type=_media_type(data, path))


def _media_type(data: bytes, name: str = "") -> str:
    for magic, media_type in _MAGIC:
        if data.startswith(magic):
            return media_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return _guess_from_name(name)


def _guess_from_name(name: str) -> str:
    ext = os.path.splitext(name.split("?")[0])[1].lower()
    return {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
            ".webp": "image/webp"}.get(ext, "image/png")
