"""HF transformers baseline on the same dummy-weight model shape, for ratios in RESULTS.md.

    python bench/hf_baseline.py --preset llama-3.1-8b --workload W1 W400 --out results.jsonl

W1 runs `generate` at batch 1 (greedy, exactly 256 new tokens); W400 runs
`generate_batch` (transformers' continuous batching with paged attention). Weights are
random (bf16, N(0, 0.02)) on the GPU; prompts come from bench/workloads.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.workloads import append_record, make_workload  # noqa: E402


def load_model(preset: str):
    from transformers import AutoModelForCausalLM

    from asgl.models import presets

    config = presets.get_preset(preset).hf_config()
    t0 = time.perf_counter()
    with torch.device("cuda"):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                     attn_implementation="sdpa")
        except TypeError:  # transformers 4 names it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16,
                                                     attn_implementation="sdpa")
    model.eval()
    torch.cuda.synchronize()
    return model, time.perf_counter() - t0


def bench_w1(model, vocab: int) -> dict:
    from transformers import GenerationConfig

    req = make_workload("W1", vocab)[0]
    ids = torch.tensor([req.input_ids], device="cuda")
    gen = GenerationConfig(max_new_tokens=req.output_len, min_new_tokens=req.output_len,
                           do_sample=False, pad_token_id=0)
    model.generate(ids, generation_config=GenerationConfig(max_new_tokens=8, do_sample=False,
                                                           pad_token_id=0))  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, generation_config=gen)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    n = out.shape[1] - ids.shape[1]
    return {"workload": "W1", "api": "generate", "output_tokens": n,
            "elapsed_s": round(elapsed, 3), "output_tok_s": round(n / elapsed, 1),
            "decode_ms_per_token": round(1e3 * elapsed / n, 2)}


def bench_batch(model, vocab: int, workload: str, max_prompts: int) -> dict:
    from transformers import GenerationConfig

    reqs = make_workload(workload, vocab)
    if max_prompts:
        reqs = reqs[:max_prompts]
    out_len = max(r.output_len for r in reqs)
    gen = GenerationConfig(max_new_tokens=out_len, do_sample=False, pad_token_id=0,
                           eos_token_id=None)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    results = model.generate_batch(inputs=[r.input_ids for r in reqs], generation_config=gen,
                                   progress_bar=False)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    n_out = sum(len(r.generated_tokens) for r in results.values())
    n_in = sum(len(r.input_ids) for r in reqs)
    return {"workload": workload, "api": "generate_batch", "num_requests": len(reqs),
            "output_tokens": n_out, "output_tokens_expected": len(reqs) * out_len,
            "elapsed_s": round(elapsed, 3), "output_tok_s": round(n_out / elapsed, 1),
            "total_tok_s": round((n_out + n_in) / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--workload", nargs="+", default=["W1", "W400"])
    parser.add_argument("--max-prompts", type=int, default=0,
                        help="generate_batch: only the first N prompts (0: all)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import transformers

    model, load_s = load_model(args.preset)
    vocab = model.config.vocab_size
    for w in args.workload:
        try:
            rec = bench_w1(model, vocab) if w == "W1" else \
                bench_batch(model, vocab, w, args.max_prompts)
        except Exception as exc:  # noqa: BLE001 - record the failure, go on with the next
            rec = {"workload": w, "error": f"{type(exc).__name__}: {exc}"[:500]}
        rec.update({"bench": "offline", "engine": f"hf-transformers {transformers.__version__}",
                    "model": args.preset, "load_s": round(load_s, 1)})
        append_record(args.out, rec)
        print(f"[hf] {w}: {rec.get('output_tok_s', 'failed')} out tok/s "
              f"{rec.get('error', '')}", flush=True)


if __name__ == "__main__":
    main()
