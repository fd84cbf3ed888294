"""Vision-language serving: time to first token with fresh and with repeated images.

    python bench/vision.py --shape llava-next-8b|qwen2-vl-7b [--num-requests 256]
        [--output r.jsonl] [any engine option, e.g. --mem-fraction-static 0.85]

A LLaVA-NeXT-8B-shaped model (llama3-llava-next-8b: Llama-3-8B + CLIP ViT-L/14-336, anyres
grids up to 2x2 tiles of 336) with dummy weights, written to a temporary directory with its
image processor config; or a Qwen2-VL-7B-shaped one (its ViT of 32 layers, M-RoPE). Each
request is one 672x672 image (LLaVA-NeXT: 2,928 positions, base tile 576 + a 48x48 map with
48 newlines; Qwen2-VL: 48x48 patches merged 2x2, 576) followed by 64 random text tokens,
128 output tokens
(greedy, ignore_eos), all submitted at once to the in-process Engine:

- fresh: every request has its own image (decoded, preprocessed, encoded, prefilled);
- repeated: every request has the same image: it is preprocessed and encoded once, and its
  KV is shared through the radix cache (the image comes first in the prompt).

Reports, per phase, output tok/s and time to first token (p50, p90, mean), and checks the
issue's target: TTFT p50 with repeated images <= 0.5x the fresh p50 of the same run.
`--shape tiny` runs the same on a CPU in seconds (a check of the script, not a result).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from asgl.config import EngineConfig  # noqa: E402

IMAGE_SIDE = 672
TEXT_TOKENS = 64
OUTPUT_TOKENS = 128


def write_model(path: str, shape: str) -> int:
    """config.json + preprocessor_config.json of the shape; returns its image token id."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig,
                              LlavaNextImageProcessor, Qwen2VLConfig, Qwen2VLImageProcessor)

    if shape == "qwen2-vl-7b":  # Qwen2-VL-7B-Instruct's published config
        text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                    num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                    max_position_embeddings=32768, rms_norm_eps=1e-6,
                    bos_token_id=151643, eos_token_id=151645,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                     "mrope_section": [16, 24, 24]})
        vision = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4,
                      patch_size=14, temporal_patch_size=2, spatial_merge_size=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=151655,
                               video_token_id=151656, vision_start_token_id=151652,
                               vision_end_token_id=151653)
        config.architectures = ["Qwen2VLForConditionalGeneration"]
        config.save_pretrained(path)
        Qwen2VLImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
                              patch_size=14, temporal_patch_size=2,
                              merge_size=2).save_pretrained(path)
        return 151655
    if shape == "llava-next-8b":  # llama3-llava-next-8b-hf's published config
        text = LlamaConfig(vocab_size=128320, hidden_size=4096, intermediate_size=14336,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                           max_position_embeddings=8192, rope_theta=500000.0,
                           rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128009)
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                  num_hidden_layers=24, num_attention_heads=16, image_size=336,
                                  patch_size=14, projection_dim=768, hidden_act="quick_gelu")
        tile, image_token = 336, 128256
    elif shape == "tiny":
        text = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=8192)
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, image_size=336, patch_size=14,
                                  hidden_act="quick_gelu")
        tile, image_token = 336, 500
    else:
        raise SystemExit(f"unknown --shape {shape!r} (llava-next-8b, qwen2-vl-7b, tiny)")
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile],
                 [tile, 3 * tile]]
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=image_token,
                             image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
                             vision_feature_select_strategy="default",
                             projector_hidden_act="gelu")
    config.architectures = ["LlavaNextForConditionalGeneration"]
    config.save_pretrained(path)
    LlavaNextImageProcessor(size={"shortest_edge": tile},
                            crop_size={"height": tile, "width": tile},
                            image_grid_pinpoints=pinpoints).save_pretrained(path)
    return image_token


def random_png(rng: np.random.Generator) -> bytes:
    from PIL import Image

    pixels = rng.integers(0, 256, size=(IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


async def run_phase(engine, prompts: list[list[int]], images: list[bytes]) -> dict:
    ttfts: list[float] = []
    tokens = 0

    async def one(ids: list[int], image: bytes) -> None:
        nonlocal tokens
        start = time.perf_counter()
        first = None
        async for chunk in engine.generate_stream(
                input_ids=ids, image_data=[image],
                sampling_params={"max_new_tokens": OUTPUT_TOKENS, "temperature": 0,
                                 "ignore_eos": True}):
            if first is None and chunk.token_ids:
                first = time.perf_counter() - start
            tokens += len(chunk.token_ids)
        ttfts.append(first)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(ids, img) for ids, img in zip(prompts, images)))
    wall = time.perf_counter() - t0
    ttfts.sort()
    return {"requests": len(prompts), "wall_s": round(wall, 3),
            "output_tok_s": round(tokens / wall, 1),
            "ttft_p50_s": round(statistics.median(ttfts), 4),
            "ttft_p90_s": round(ttfts[int(0.9 * (len(ttfts) - 1))], 4),
            "ttft_mean_s": round(statistics.fmean(ttfts), 4)}


async def main_async(args: argparse.Namespace, cfg: EngineConfig, image_token: int) -> dict:
    from asgl.engine.loop.engine import Engine

    rng = np.random.default_rng(0)
    n = args.num_requests
    vocab = min(image_token, 128000)  # text ids below the image token (and the specials)
    prompts = [[image_token] + rng.integers(10, vocab - 10, TEXT_TOKENS).tolist()
               for _ in range(n)]
    print(f"encoding {n + 5} random {IMAGE_SIDE}x{IMAGE_SIDE} PNGs ...", flush=True)
    fresh = [random_png(rng) for _ in range(n)]
    warm = [random_png(rng) for _ in range(4)]
    same = random_png(rng)
    engine = await Engine(cfg).start()
    try:
        await run_phase(engine, prompts[:4], warm)  # first-use kernels, pools, allocator
        engine.flush_cache()
        result = {"shape": args.shape, "image": f"{IMAGE_SIDE}x{IMAGE_SIDE}",
                  "text_tokens": TEXT_TOKENS, "output_tokens": OUTPUT_TOKENS}
        result["fresh"] = await run_phase(engine, prompts, fresh)
        engine.flush_cache()
        result["repeated"] = await run_phase(engine, prompts, [same] * n)
        result["images_encoded"] = engine.runner.mm_encoder.images_encoded
        result["images_preprocessed"] = engine.images.preprocessed
    finally:
        await engine.shutdown()
    ratio = result["repeated"]["ttft_p50_s"] / result["fresh"]["ttft_p50_s"]
    result["ttft_p50_ratio"] = round(ratio, 3)
    result["target_met"] = ratio <= 0.5
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llava-next-8b")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--output", default=None, help="append the result as a JSON line")
    EngineConfig.add_cli_args(parser)
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix=f"asgl-vision-{args.shape}-")
    image_token = write_model(tmp, args.shape)
    opts = {k: v for k, v in vars(args).items() if k not in ("shape", "num_requests", "output")}
    cfg = EngineConfig.from_namespace(argparse.Namespace(**opts)).replace(
        model_path=tmp, load_format="dummy", skip_tokenizer_init=True)
    result = asyncio.run(main_async(args, cfg, image_token))
    print(json.dumps(result, indent=1))
    if args.output:
        with open(args.output, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
