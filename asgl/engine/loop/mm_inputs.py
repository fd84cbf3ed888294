"""Images of a request to the model's prompt inputs, off the event loop.

`ImageInputs.prepare(ids, images)` (awaited on the loop) decodes and preprocesses every
image in a thread pool of its own (Pillow and the checkpoint's own transformers image
processor, its slow/PIL variant: torchvision is not needed), then expands each image token
of the prompt to the number of positions the image's features fill, and returns the
expanded ids with the `MMInputs` the scheduler and worker use
(engine/contracts/multimodal.py).

Every bad image is an `InvalidRequest` (HTTP 400) naming the problem and the limit: not an
image, too many pixels (checked from the header, before anything is decoded), a truncated
or corrupt file, more images than `--max-images-per-request`, more images than the prompt
has image tokens (or fewer).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from asgl.engine.contracts.errors import InvalidRequest
from asgl.engine.contracts.multimodal import MMInputs, MMItem

logger = logging.getLogger(__name__)

# Seconds one request's images may take to decode and preprocess.
PREPROCESS_TIMEOUT_S = 60.0
# Preprocessed images kept by the digest of their encoded bytes: an image sent again (a
# conversation's next turn, many requests about one picture) skips decoding and resizing.
PREPROCESSED_CACHE = 32


def load_image_processor(model_dir: str) -> Any:
    """The checkpoint's image processor (preprocessor_config.json), its PIL backend."""
    from transformers import AutoImageProcessor

    try:  # transformers >= 5 names the backend; older versions take use_fast=False
        return AutoImageProcessor.from_pretrained(model_dir, backend="pil",
                                                  local_files_only=True)
    except TypeError:
        return AutoImageProcessor.from_pretrained(model_dir, use_fast=False,
                                                  local_files_only=True)


class ImageInputs:
    """One engine's image front: the model's host-side spec (`Model.image_inputs`) plus
    the request limits."""

    def __init__(self, spec: Any, *, max_images: int = 16, max_pixels: int = 40_000_000,
                 threads: Optional[int] = None):
        self.spec = spec
        self.placeholder: str = spec.placeholder
        self.image_token_id: int = spec.image_token_id
        # video (a list of frames; OneVision): its placeholder and token, else None
        self.video_placeholder: Optional[str] = getattr(spec, "video_placeholder", None)
        self.video_token_id: Optional[int] = getattr(spec, "video_token_id", None)
        self.max_images = max_images
        self.max_pixels = max_pixels
        self._pool = ThreadPoolExecutor(threads or max(1, min(4, os.cpu_count() or 1)),
                                        thread_name_prefix="asgl-images")
        self._done: OrderedDict[bytes, tuple[dict, int, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.preprocessed = 0  # images decoded and preprocessed (not served from the cache)

    @classmethod
    def for_model(cls, model_cls: type, hf_config: Any, model_dir: Optional[str],
                  config: Any) -> Optional["ImageInputs"]:
        """The image front of a vision-language model, None for a text-only one."""
        spec_cls = getattr(model_cls, "image_inputs", None)
        if spec_cls is None:
            return None
        if model_dir is None:
            raise ValueError("a vision-language model needs its directory for the image "
                             "processor (preprocessor_config.json)")
        built = getattr(hf_config, "asgl_image_processor", None)  # (LLaVA-repo layout)
        if built is not None and not os.path.isfile(os.path.join(model_dir,
                                                                 "preprocessor_config.json")):
            from asgl.models.llava_repo import build_image_processor
            processor = build_image_processor(built)
        else:
            processor = load_image_processor(model_dir)
        spec = spec_cls(hf_config, processor)
        return cls(spec, max_images=config.max_images_per_request,
                   max_pixels=config.max_image_pixels)

    def add_image_token(self, tokenizer: Any, vocab_size: int) -> None:
        """Give the placeholder an id: a special token added to the tokenizer (or, without
        a tokenizer, the first id past the vocabulary, for input_ids callers)."""
        if tokenizer is None:
            token_id = vocab_size
        else:
            from tokenizers import AddedToken

            tokenizer.add_tokens([AddedToken(self.placeholder, special=True, normalized=False)],
                                 special_tokens=True)
            token_id = tokenizer.convert_tokens_to_ids(self.placeholder)
        self.image_token_id = self.spec.image_token_id = int(token_id)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def prepare(self, ids: Sequence[int], images: Sequence[Any],
                      param: str = "image_data", names: Optional[Sequence[str]] = None
                      ) -> tuple[list[int], Optional[MMInputs]]:
        """(the prompt with each image token expanded, its MMInputs); `images` are
        encoded bytes or PIL images, or `Video`s (lists of frames), in prompt order;
        `names[k]` is entry k's request field (errors name it; default `param[k]`)."""
        if not images:
            return list(ids), None
        kinds = ["video" if isinstance(x, Video) else "image" for x in images]
        if "video" in kinds and self.video_token_id is None:
            raise InvalidRequest("this model takes images, not video", param)
        count = sum(len(x.frames) if isinstance(x, Video) else 1 for x in images)
        if count > self.max_images:
            raise InvalidRequest(f"{count} images (video frames count one each) in one "
                                 f"request; the limit is {self.max_images} "
                                 "(--max-images-per-request)", param)
        if any(isinstance(x, Video) and not x.frames for x in images):
            raise InvalidRequest("a video needs at least one frame", param)
        tokens = {self.image_token_id: "image", self.video_token_id: "video"}
        found = [(i, tokens[t]) for i, t in enumerate(ids) if t in tokens]
        slots = [i for i, _ in found]
        if [k for _, k in found] != kinds:
            def counts(ks):
                return f"{ks.count('image')} image(s), {ks.count('video')} video(s)"
            raise InvalidRequest(
                f"the prompt has placeholders for {counts([k for _, k in found])} "
                f"({self.placeholder!r} per image"
                + (f", {self.video_placeholder!r} per video" if self.video_placeholder else "")
                + f") but {counts(kinds)} were given, in that order: each needs one", param)
        loop = asyncio.get_running_loop()
        names = names or [f"{param}[{k}]" for k in range(len(images))]
        futures = [loop.run_in_executor(self._pool, self._process, img, name)
                   for img, name in zip(images, names)]
        try:
            done = await asyncio.wait_for(asyncio.gather(*futures), PREPROCESS_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise InvalidRequest(f"preprocessing the images took longer than "
                                 f"{PREPROCESS_TIMEOUT_S:.0f} s", param) from None
        several = getattr(self.spec, "several", None)
        if several is not None and kinds.count("image") > 1:  # a model that shows several images
            # differently (OneVision: base tiles only): other features, so another digest
            # (the radix cache and the worker's feature cache key by it)
            done = [(r[0], r[1], _variant(r[2]), *r[3:]) if k == "image" else r
                    for k, r in zip(kinds, (several(*d) if k == "image" else d
                                            for k, d in zip(kinds, done)))]
        out: list[int] = []
        items: list[MMItem] = []
        prev = 0
        for slot, kind, (data, n, digest, mrope, advance) in zip(slots, kinds, done):
            out.extend(ids[prev:slot])
            items.append(MMItem(digest=digest, offset=len(out), length=n, data=data,
                                mrope=mrope, advance=advance, modality=kind))
            out.extend([ids[slot]] * n)
            prev = slot + 1
        out.extend(ids[prev:])
        return out, MMInputs(items)

    def _process(self, image: Any, where: str) -> tuple:
        """On the image pool: decode, check, digest and preprocess one image (or find it
        preprocessed already, by its encoded bytes)."""
        if isinstance(image, Video):
            return self._preprocess_video(image, where)
        key = None
        if isinstance(image, (bytes, bytearray, memoryview)):
            key = hashlib.blake2b(bytes(image), digest_size=16).digest()
            with self._lock:
                hit = self._done.get(key)
                if hit is not None:
                    self._done.move_to_end(key)
                    return hit
        out = self._preprocess(image, where)
        if key is not None:
            with self._lock:
                self._done[key] = out
                while len(self._done) > PREPROCESSED_CACHE:
                    self._done.popitem(last=False)
        return out

    def _preprocess(self, image: Any, where: str) -> tuple:
        """(host tensors, positions, digest, M-RoPE positions or None, rotary advance)."""
        self.preprocessed += 1
        rgb = decode_image(image, self.max_pixels, where)
        h = hashlib.blake2b(digest_size=8)
        h.update(f"{rgb.size[0]}x{rgb.size[1]}".encode())
        h.update(rgb.tobytes())
        digest = int.from_bytes(h.digest(), "little")
        try:
            # (data, positions), or with M-RoPE (data, positions, 3-D positions, advance)
            data, n, *rope = self.spec.process(rgb)
        except Exception as e:  # noqa: BLE001 - the processor refused this image
            raise InvalidRequest(f"{where}: the image processor failed on this image: {e}",
                                 where) from None
        mrope, advance = rope if rope else (None, 0)
        return data, n, digest, mrope, advance


    def _preprocess_video(self, video: "Video", where: str) -> tuple:
        frames = [decode_image(f, self.max_pixels, f"{where}[{k}]")
                  for k, f in enumerate(video.frames)]
        h = hashlib.blake2b(digest_size=8, person=b"video")
        for rgb in frames:
            h.update(f"{rgb.size[0]}x{rgb.size[1]}".encode())
            h.update(rgb.tobytes())
        try:
            data, n = self.spec.process_video(frames)
        except Exception as e:  # noqa: BLE001
            raise InvalidRequest(f"{where}: the image processor failed on these frames: {e}",
                                 where) from None
        return data, n, int.from_bytes(h.digest(), "little"), None, 0


@dataclass(frozen=True)
class Video:
    """A video as a list of frames (encoded images or PIL images), in order."""
    frames: tuple


def _variant(digest: int) -> int:
    return int.from_bytes(hashlib.blake2b(digest.to_bytes(8, "little") + b"several",
                                          digest_size=8).digest(), "little")


def decode_image(image: Any, max_pixels: int, where: str) -> Any:
    """An RGB PIL image from encoded bytes (or a PIL image), checked."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, (bytes, bytearray, memoryview)):
        if not image:
            raise InvalidRequest(f"{where}: the image is empty", where)
        try:
            with warnings.catch_warnings():  # PIL's bomb warning: our own limit is below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(bytes(image)))
        except UnidentifiedImageError:
            raise InvalidRequest(f"{where}: not an image (no known image format: PNG, JPEG, "
                                 "GIF, WebP, BMP, ...)", where) from None
        except Exception as e:  # noqa: BLE001
            raise InvalidRequest(f"{where}: cannot read this image: {e}", where) from None
    else:
        raise InvalidRequest(f"{where}: an image must be encoded bytes, got "
                             f"{type(image).__name__}", where)
    w, h = img.size  # from the header: nothing decoded yet
    if w <= 0 or h <= 0:
        raise InvalidRequest(f"{where}: the image has no pixels ({w}x{h})", where)
    if w * h > max_pixels:
        raise InvalidRequest(f"{where}: the image is {w}x{h} = {w * h} pixels; the limit is "
                             f"{max_pixels} (--max-image-pixels)", where)
    try:
        img.load()
        return img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data
        raise InvalidRequest(f"{where}: the image data is truncated or corrupt ({e})",
                             where) from None
