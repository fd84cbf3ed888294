"""Vision-language models through the server's OpenAI chat API with data-URL images,
against transformers: LLaVA 1.5, LLaVA-NeXT and Qwen2-VL.

A tiny random-weight `LlavaForConditionalGeneration` (CLIP ViT + MLP projector + Llama),
saved with `save_pretrained` with its tokenizer and CLIP image processor
(tests/vlm_fixtures.py), is served in float32 on the CPU with 8-token prefill chunks (so an
image's 16 positions are split across steps). The reference is transformers' own
`LlavaProcessor` (prompt expansion, pixels) and `generate` (greedy) on the same files; the
prompt is written out from vicuna_v1.1's published format. LLaVA-NeXT likewise
(`LlavaNextProcessor`); Qwen2-VL's prompt (qwen2-vl's format) is expanded by its image
processor's grids (h * w / merge^2 per image, which the HF model checks against its
features) and HF computes the M-RoPE positions itself. LLaVA-OneVision's prompt is expanded
by LlavaOnevisionProcessor's own counting (its video processor needs torchvision, so the
counts are called on a stand-in, tests/vlm_fixtures.py). Tokens agree up to a near-tie
(top-2 gap < 1e-3). The families run with overlap scheduling on, the LLaVA server with it
off.
"""

from __future__ import annotations

import struct
import zlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("PIL")

from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from asgl.config import EngineConfig  # noqa: E402
from asgl.engine.loop.engine import Engine  # noqa: E402
from asgl.server.app import build_app  # noqa: E402
from vlm_fixtures import (agree, data_url, hf_greedy, hf_llava, hf_qwen2_vl_greedy,  # noqa
                          image_bytes, save_tiny_llava, save_tiny_qwen2_vl)

pytestmark = pytest.mark.asyncio(loop_scope="module")  # the engine lives on the module's loop
MAX_NEW = 8
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
          "assistant gives helpful, detailed, and polite answers to the user's questions.")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> str:
    return save_tiny_llava(str(tmp_path_factory.mktemp("llava")))


@pytest.fixture(scope="module")
def hf(llava_dir):
    return hf_llava(llava_dir)


def _config(llava_dir: str, **kw) -> EngineConfig:
    base = dict(model_path=llava_dir, dtype="float32", device="cpu", chunked_prefill_size=8,
                max_total_tokens=4096, chat_template="vicuna_v1.1", max_images_per_request=3,
                debug_check_integrity=True, disable_overlap_schedule=True)
    base.update(kw)
    return EngineConfig(**base)


@pytest.fixture(scope="module")
async def server(llava_dir):
    cfg = _config(llava_dir)
    engine = await Engine(cfg).start()
    async with TestClient(TestServer(build_app(engine, cfg))) as client:
        yield client, engine
    await engine.shutdown()


def _hf_greedy(hf, prompt: str, images: list[bytes]) -> tuple[list[int], list[float], int]:
    return hf_greedy(hf, prompt, images, MAX_NEW)[:3]


def _agree(text: str, ref: list[int], gaps: list[float], tok) -> None:
    agree(text, ref, gaps, tok)


def _chat(question: str, images: list[bytes], **extra) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(b)}} for b in images]
    parts.append({"type": "text", "text": question})
    body = {"model": "m", "messages": [{"role": "user", "content": parts}],
            "max_tokens": MAX_NEW, "temperature": 0}
    body.update(extra)
    return body


def _prompt(question: str, n_images: int) -> str:
    """vicuna_v1.1 as published (FastChat / SGLang): system, " USER: ", " ASSISTANT:";
    each image part is the placeholder, parts joined by newlines."""
    content = "\n".join(["<image>"] * n_images + [question])
    return f"<s>{SYSTEM} USER: {content} ASSISTANT:"


QWEN_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def _qwen_prompt(question: str, n_images: int) -> str:
    """qwen2-vl as published: ChatML with the default system message."""
    content = "\n".join([QWEN_PLACEHOLDER] * n_images + [question])
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module", params=["llava", "next", "onevision", "qwen2-vl"])
async def family(request, tmp_path_factory):
    """LLaVA 1.5; LLaVA-NeXT (anyres: images of other aspect ratios pick other grids, so
    two images fill different numbers of positions); LLaVA-OneVision (SigLIP, Qwen2; the
    single image's map is shrunk by anyres_max, two images are base tiles only); Qwen2-VL
    (native resolution, M-RoPE).
    Yields (client, reference(question, images) -> HF's tokens, gaps, _, prompt length,
    tokenizer)."""
    kind = request.param
    path = str(tmp_path_factory.mktemp(kind))
    if kind == "qwen2-vl":
        save_tiny_qwen2_vl(path, seed=1)
        import transformers
        model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32).eval()
        tok = transformers.AutoTokenizer.from_pretrained(path)

        def reference(question, images):
            return hf_qwen2_vl_greedy(path, _qwen_prompt(question, len(images)), images,
                                      MAX_NEW, hf=model)
    else:
        save_tiny_llava(path, kind=kind, seed=1)
        hf = hf_llava(path)
        tok = hf[2]

        def reference(question, images):
            return hf_greedy(hf, _prompt(question, len(images)), images, MAX_NEW)
    cfg = _config(path, chat_template="qwen2-vl" if kind == "qwen2-vl" else "vicuna_v1.1",
                  disable_overlap_schedule=False)
    engine = await Engine(cfg).start()
    async with TestClient(TestServer(build_app(engine, cfg))) as client:
        yield client, reference, tok
    await engine.shutdown()


@pytest.mark.parametrize("n_images", [1, 2])
async def test_chat_with_images_matches_hf(family, n_images):
    client, reference, tok = family
    sizes = [(100, 90)] if n_images == 1 else [(40, 30), (81, 30)]
    images = [image_bytes(10 + k, size=size) for k, size in enumerate(sizes)]
    question = "what is in this image?" if n_images == 1 else "compare the two images"
    ref, gaps, _, n_prompt = reference(question, images)
    resp = await client.post("/v1/chat/completions", json=_chat(question, images))
    body = await resp.json()
    assert resp.status == 200, body
    _agree(body["choices"][0]["message"]["content"], ref, gaps, tok)
    assert body["usage"]["prompt_tokens"] == n_prompt  # placeholders expanded as HF does


async def test_native_generate_image_data(server, hf):
    client, _ = server
    images = [image_bytes(21), image_bytes(22, size=(20, 50))]
    prompt = _prompt("describe the picture in one word", 2)
    ref, gaps, _ = _hf_greedy(hf, prompt, images)
    import base64
    body = {"text": prompt, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0},
            # a data URL and SGLang's bare base64
            "image_data": [data_url(images[0]), base64.b64encode(images[1]).decode()]}
    resp = await client.post("/generate", json=body)
    out = await resp.json()
    assert resp.status == 200, out
    _agree(out["text"], ref, gaps, hf[2])


async def test_same_image_hits_the_cache_and_one_pixel_misses(server, hf, llava_dir):
    client, engine = server
    img = image_bytes(31, size=(33, 47))
    first = await (await client.post("/v1/chat/completions",
                                     json=_chat("hello world", [img]))).json()
    encoded = engine.runner.mm_encoder.images_encoded
    preprocessed = engine.images.preprocessed
    again = await (await client.post("/v1/chat/completions",
                                     json=_chat("the quick brown fox", [img]))).json()
    _, _, image_at = _hf_greedy(hf, _prompt("hello world", 1), [img])
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= image_at + 16, (cached, image_at)  # the image's KV was reused...
    assert engine.runner.mm_encoder.images_encoded == encoded  # ...and not encoded again
    assert engine.images.preprocessed == preprocessed  # nor decoded and resized again
    changed = image_bytes(31, size=(33, 47), change_pixel=True)
    other = await (await client.post("/v1/chat/completions",
                                     json=_chat("the quick brown fox", [changed]))).json()
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == image_at
    assert engine.runner.mm_encoder.images_encoded == encoded + 1

    # the same requests with the cache off give the same outputs
    cfg = _config(llava_dir, disable_radix_cache=True)
    plain = await Engine(cfg).start()
    try:
        async with TestClient(TestServer(build_app(plain, cfg))) as c2:
            for body, got in ((_chat("hello world", [img]), first),
                              (_chat("the quick brown fox", [img]), again),
                              (_chat("the quick brown fox", [changed]), other)):
                ref = await (await c2.post("/v1/chat/completions", json=body)).json()
                assert ref["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
                assert ref["choices"][0]["message"] == got["choices"][0]["message"]
    finally:
        await plain.shutdown()


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data follows)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height,
                                                              8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _bad_bodies():
    png = image_bytes(41)
    part = lambda url: {"type": "image_url", "image_url": {"url": url}}  # noqa: E731
    msg = lambda *parts: {"model": "m", "max_tokens": 2, "messages": [  # noqa: E731
        {"role": "user", "content": list(parts) + [{"type": "text", "text": "hi"}]}]}
    return {
        "not an image": (msg(part(data_url(b"hello, I am text", "image/png"))), "not an image"),
        "huge": (msg(part(data_url(_png_header(10000, 10000)))), "--max-image-pixels"),
        "truncated": (msg(part(data_url(png[:len(png) // 2]))), "truncated"),
        "too many": (msg(*[part(data_url(png))] * 4), "--max-images-per-request"),
        "http": (msg(part("https://example.com/cat.png")), "--enable-image-url-fetch"),
        "local path": (msg(part("file:///etc/passwd")), "--allowed-local-media-path"),
        "bad base64": (msg(part("data:image/png;base64,@@@@")), "base64"),
        "not image mime": (msg(part("data:text/plain;base64,aGk=")), "not an image"),
        "detail": (msg({"type": "image_url", "image_url": {"url": data_url(png),
                                                           "detail": "ultra"}}), "detail"),
        "no url": (msg({"type": "image_url", "image_url": {"uri": "x"}}), "url"),
    }


@pytest.mark.parametrize("case", sorted(_bad_bodies()))
async def test_bad_images_are_400_and_the_server_still_answers(server, case):
    client, _ = server
    body, needle = _bad_bodies()[case]
    resp = await client.post("/v1/chat/completions", json=body)
    err = await resp.json()
    assert resp.status == 400, err
    assert needle in err["error"]["message"], err
    ok = await client.post("/v1/chat/completions", json=_chat("hi", [image_bytes(5)],
                                                              max_tokens=2))
    assert ok.status == 200


async def test_native_bad_image_data(server):
    client, _ = server
    sp = {"max_new_tokens": 2}
    cases = [({"text": "no placeholder here", "image_data": data_url(image_bytes(1)),
               "sampling_params": sp}, "placeholder"),
             ({"text": ["<image> a", "<image> b"], "image_data": [data_url(image_bytes(1))],
               "sampling_params": sp}, "one per prompt"),
             ({"text": "<image> a", "image_data": "http://10.0.0.1/x.png",
               "sampling_params": sp}, "--enable-image-url-fetch"),
             ({"text": "<image> a", "image_data": "%%%notbase64", "sampling_params": sp},
              "base64")]
    for body, needle in cases:
        resp = await client.post("/generate", json=body)
        err = await resp.json()
        assert resp.status == 400 and needle in err["error"]["message"], (body, err)
    resp = await client.post("/generate", json={"text": "<image> a", "sampling_params": sp,
                                                "image_data": data_url(image_bytes(1))})
    assert resp.status == 200


async def test_local_files_and_url_fetch_flags(server, tmp_path):
    """--allowed-local-media-path serves files inside the directory only;
    --enable-image-url-fetch fetches, but never from loopback / private addresses."""
    _, engine = server
    media = tmp_path / "media"
    media.mkdir()
    (media / "cat.png").write_bytes(image_bytes(71))
    (tmp_path / "outside.png").write_bytes(image_bytes(72))
    cfg = _config(engine.config.model_path, allowed_local_media_path=str(media),
                  enable_image_url_fetch=True)
    async with TestClient(TestServer(build_app(engine, cfg))) as client:
        def body(url):
            return {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "hi"}]}]}

        ok = await client.post("/v1/chat/completions", json=body(f"file://{media}/cat.png"))
        assert ok.status == 200, await ok.json()
        ok = await client.post("/v1/chat/completions", json=body(str(media / "cat.png")))
        assert ok.status == 200, await ok.json()
        for url, needle in ((f"file://{tmp_path}/outside.png", "outside"),
                            (f"file://{media}/../outside.png", "outside"),
                            (f"file://{media}/missing.png", "cannot read"),
                            ("http://127.0.0.1:9/x.png", "private or local"),
                            ("http://localhost/x.png", "private or local"),
                            ("ftp://example.com/x.png", "unsupported URL scheme")):
            resp = await client.post("/v1/chat/completions", json=body(url))
            err = await resp.json()
            assert resp.status == 400 and needle in err["error"]["message"], (url, err)


async def test_image_flags_validate_and_tp_is_refused(llava_dir):
    from asgl.config import ConfigError
    from asgl.engine.contracts.errors import ModelLoadError

    for flag, value in (("max_images_per_request", 0), ("max_image_pixels", -1),
                        ("max_image_bytes_mb", 0), ("image_fetch_timeout", 0)):
        with pytest.raises(ConfigError, match=f"--{flag.replace('_', '-')}"):
            EngineConfig(**{flag: value})
    engine = Engine(_config(llava_dir, tp_size=2))
    with pytest.raises(ModelLoadError, match="--tp 1"):  # before any rank starts
        await engine.start()
    engine.worker.shutdown()
