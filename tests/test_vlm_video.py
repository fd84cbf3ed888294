"""LLaVA-OneVision with a video (a list of frames) through the server: the chat API's
`video_url` part ({"url": [frame data URLs]}) and the native `video_data`, against
transformers' `generate` with `pixel_values_videos` (frames: the image processor's base
tile of each; prompt expanded by LlavaOnevisionProcessor's own `replace_video_token`); and
bad video inputs, each a 400 with the server still answering."""

from __future__ import annotations

import io

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("PIL")

from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from asgl.config import EngineConfig  # noqa: E402
from asgl.engine.loop.engine import Engine  # noqa: E402
from asgl.server.app import build_app  # noqa: E402
from vlm_fixtures import agree, data_url, hf_llava, image_bytes, save_tiny_llava  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="module")
MAX_NEW = 8
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
          "assistant gives helpful, detailed, and polite answers to the user's questions.")
FRAMES = [image_bytes(80 + k, size=(40, 30)) for k in range(4)]


@pytest.fixture(scope="module")
def ov_dir(tmp_path_factory) -> str:
    return save_tiny_llava(str(tmp_path_factory.mktemp("ov")), kind="onevision", seed=4)


@pytest.fixture(scope="module")
async def client(ov_dir):
    cfg = EngineConfig(model_path=ov_dir, dtype="float32", device="cpu", chunked_prefill_size=8,
                       max_total_tokens=4096, chat_template="vicuna_v1.1",
                       max_images_per_request=6, debug_check_integrity=True)
    engine = await Engine(cfg).start()
    async with TestClient(TestServer(build_app(engine, cfg))) as c:
        yield c
    await engine.shutdown()


def _reference(ov_dir: str, prompt: str, frames: list[bytes], images: list[bytes]):
    from PIL import Image

    model, proc, tok = hf_llava(ov_dir)
    pil = lambda bs: [Image.open(io.BytesIO(b)).convert("RGB") for b in bs]  # noqa: E731
    inputs = proc(prompt, pil(images), video=pil(frames))
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    n = inputs["input_ids"].shape[1]
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return out.sequences[0, n:].tolist(), gaps, n, tok


async def test_chat_video_matches_hf(client, ov_dir):
    ref, gaps, n, tok = _reference(ov_dir, f"<s>{SYSTEM} USER: <video>\nwhat happens? ASSISTANT:",
                                   FRAMES, [])
    body = {"model": "m", "max_tokens": MAX_NEW, "temperature": 0, "messages": [
        {"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": [data_url(f) for f in FRAMES]}},
            {"type": "text", "text": "what happens?"}]}]}
    resp = await client.post("/v1/chat/completions", json=body)
    out = await resp.json()
    assert resp.status == 200, out
    agree(out["choices"][0]["message"]["content"], ref, gaps, tok)
    assert out["usage"]["prompt_tokens"] == n


async def test_native_video_and_image_match_hf(client, ov_dir):
    image = image_bytes(90, size=(50, 60))
    prompt = "<s>USER: <video>\n<image>\nwhat happens? ASSISTANT:"
    ref, gaps, n, tok = _reference(ov_dir, prompt, FRAMES, [image])
    body = {"text": prompt, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0},
            "video_data": [data_url(f) for f in FRAMES], "image_data": data_url(image)}
    resp = await client.post("/generate", json=body)
    out = await resp.json()
    assert resp.status == 200, out
    agree(out["text"], ref, gaps, tok)
    assert out["meta_info"]["prompt_tokens"] == n


async def test_bad_video_inputs_are_400(client):
    frames = [data_url(f) for f in FRAMES]

    def chat(video_url):
        return {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": video_url}, {"type": "text", "text": "hi"}]}]}

    cases = [
        ("/v1/chat/completions", chat({"url": frames[0]}), "list of frames"),
        ("/v1/chat/completions", chat({"url": []}), "list of frames"),
        ("/v1/chat/completions", chat({"url": frames * 2}), "--max-images-per-request"),
        ("/v1/chat/completions", chat({"url": [frames[0], data_url(b"not a picture")]}),
         "video_url[1]: not an image"),
        ("/generate", {"text": "<image> hi", "video_data": frames}, "placeholders"),
        ("/generate", {"text": "<video> hi", "video_data": "x"}, "list of frames"),
    ]
    for path, body, needle in cases:
        resp = await client.post(path, json=body)
        err = await resp.json()
        assert resp.status == 400 and needle in err["error"]["message"], (body, err)
    ok = await client.post("/generate", json={"text": "<video> hi", "video_data": frames,
                                              "sampling_params": {"max_new_tokens": 2}})
    assert ok.status == 200, await ok.json()
