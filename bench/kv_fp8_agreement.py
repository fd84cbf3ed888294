"""How often greedy decoding with an FP8 KV cache gives the same tokens as full precision.

On the embedded SmolLM2-135M-Instruct (or --model-path), N prompts x T greedy tokens are
generated with `--kv-cache-dtype auto` (the model dtype: float32 on the CPU, bf16 on a GPU)
and again with each FP8 KV dtype, with the radix cache on and chunked prefill. Two scores, over N x T:
- free running: per prompt, the tokens before its first difference (everything after a
  difference counts as different, though the text then simply goes another way);
- teacher forced: the reference's prompt + tokens are fed with the FP8 cache, and a position
  counts when the FP8 model's argmax there is the reference's token (per-token agreement
  without drift: how often FP8 KV alone changes a greedy choice).

    python bench/kv_fp8_agreement.py                      # CPU, 64 x 64, torch attention
    python bench/kv_fp8_agreement.py --device cuda --attention-backend flashinfer
    python bench/kv_fp8_agreement.py --device cuda --attention-backend triton
"""

from __future__ import annotations

import argparse
import json
import time

TOPICS = [
    "the Roman Empire", "photosynthesis", "black holes", "the French Revolution", "volcanoes",
    "machine learning", "the printing press", "coral reefs", "the immune system", "jazz music",
    "the Great Wall of China", "quantum computing", "honey bees", "the Industrial Revolution",
    "plate tectonics", "the human brain", "renewable energy", "ancient Egypt", "the internet",
    "climate change", "the Moon landing", "chess", "the water cycle", "Shakespeare",
    "electric cars", "the Renaissance", "DNA", "the Amazon rainforest", "the stock market",
    "vaccines", "the Olympic Games", "glaciers", "the Silk Road", "artificial satellites",
    "coffee", "the piano", "earthquakes", "the solar system", "democracy", "bread baking",
    "the Cold War", "penguins", "the theory of relativity", "origami", "the Nile river",
    "cryptography", "the Eiffel Tower", "tea ceremonies", "mountain climbing", "the Vikings",
    "rainbows", "the periodic table", "hurricanes", "the Mona Lisa", "submarines",
    "the blockchain", "dinosaurs", "the Sahara desert", "opera", "the human heart",
    "wind turbines", "the Aztec empire", "bicycles", "lighthouses",
]
FORMS = ["Write a short paragraph about {}.", "Explain {} to a ten-year-old.",
         "List three surprising facts about {}.", "What is the most important thing to "
         "know about {}?"]


def prompts(n: int) -> list[str]:
    return [FORMS[i % len(FORMS)].format(TOPICS[i % len(TOPICS)]) for i in range(n)]


def tokenize(texts: list[str], **options) -> list[list[int]]:
    from asgl.engine.loop.sync_engine import LLM

    with LLM(**options) as llm:
        tok = llm.engine.tokenizer
        return [tok.encode(t) for t in texts]


def generate(kv_dtype: str, ids: list[list[int]], tokens: int, **options) -> list[list[int]]:
    from asgl.engine.loop.sync_engine import LLM

    with LLM(kv_cache_dtype=kv_dtype, skip_tokenizer_init=True, **options) as llm:
        outs = llm.generate(ids, {"temperature": 0, "max_new_tokens": tokens,
                                  "ignore_eos": True})
    return [o.output_ids for o in outs]


def teacher_forced(kv_dtype: str, ids: list[list[int]], ref: list[list[int]],
                   **options) -> tuple[int, int]:
    """(positions where the FP8-KV model's argmax, given the reference's own tokens so far,
    is the reference's token; all positions): per-token agreement without drift."""
    from asgl.engine.loop.sync_engine import LLM

    same = total = 0
    with LLM(kv_cache_dtype=kv_dtype, skip_tokenizer_init=True, **options) as llm:
        outs = [llm.generate(p + r, {"temperature": 0, "max_new_tokens": 1},
                             return_logprob=True, logprob_start_len=len(p), top_logprobs_num=1)
                for p, r in zip(ids, ref)]
    for out, r in zip(outs, ref):
        top = [pos[0][1] for pos in out.input_top_logprobs]
        same += sum(a == b for a, b in zip(top, r))
        total += len(r)
    return same, total


def agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[int, int]:
    """(tokens equal before each prompt's first difference, all reference tokens)."""
    same = 0
    for a, b in zip(ref, got):
        for x, y in zip(a, b):
            if x != y:
                break
            same += 1
    return same, sum(len(a) for a in ref)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--model-path", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--chunked-prefill-size", type=int, default=32)
    p.add_argument("--kv-dtypes", default="fp8_e4m3,fp8_e5m2")
    args = p.parse_args(argv)
    options = dict(model_path=args.model_path, device=args.device,
                   attention_backend=args.attention_backend,
                   chunked_prefill_size=args.chunked_prefill_size, max_total_tokens=16384)
    ids = tokenize(prompts(args.prompts), **options)
    t0 = time.perf_counter()
    ref = generate("auto", ids, args.tokens, **options)
    report = {"prompts": args.prompts, "tokens": args.tokens, "device": args.device,
              "attention_backend": args.attention_backend}
    # control: the full-precision cache itself, teacher forced (prefill vs decode numerics)
    control, total = teacher_forced("auto", ids, ref, **options)
    report["auto_teacher_forced_percent"] = round(100.0 * control / total, 2)
    for kv in [k for k in args.kv_dtypes.split(",") if k]:
        same, total = agreement(ref, generate(kv, ids, args.tokens, **options))
        forced, _ = teacher_forced(kv, ids, ref, **options)
        report[kv] = {"free_running_identical": same, "teacher_forced_identical": forced,
                      "total": total, "free_running_percent": round(100.0 * same / total, 2),
                      "teacher_forced_percent": round(100.0 * forced / total, 2)}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
