"""MLA attention on one GPU: correctness of the latent-cache kernels in bf16 and the
decode kernels' speed against the memory bandwidth measured in the same run.

    python bench/gpu_mla.py check [--out R]   # bf16 decode kernels vs the float32 reference
    python bench/gpu_mla.py bench [--out R] [--batch 64] [--context 4096] [--sweep]
    python bench/gpu_mla.py model [--out R]   # a DeepSeek-V2 model through the engine vs HF

check: the Triton MLA decode kernel (`mla_decode_attention`) and FlashInfer's paged MLA
kernel through our backend (`FlashInferMLABackend`), bf16, on the DeepSeek-V2-Lite
(16 heads), DeepSeek-V3 (128 heads) and MiniCPM 3 (40 heads, 256 + 32 dims) shapes, with
scattered slots and uneven lengths, against `mla_decode_ref` in float32 on the same
rounded inputs: PASS when ||out - ref|| / ||ref|| < 1e-2 and no NaN. (The whole latent
attention, extend batches included, is tests/test_mla_kernels.py, which runs compiled on a
GPU with longer sequences: `python -m pytest tests/test_mla_kernels.py -q`.)

model: a 3-layer DeepSeek-V2 with V2-Lite's attention dims (16 heads, 512 + 64 latent,
YaRN) and a MoE layer, random weights saved by transformers, served by `asgl.LLM` on the
GPU with chunked prefill (64-token chunks) and a radix-cache hit: in float32 (torch and
Triton backends; Triton replays CUDA graphs for decode) every logits row within 1e-3
relative of transformers' float32 logits on the CPU; in bf16 (Triton, FlashInfer) within
5e-2. Exercises the latent pool, expanded prefill, absorbed decode and graphs end to end.

bench: one decode step's attention of `--batch` requests of `--context` cached tokens
(default 64 x 4096) over the latent pool: bytes read = batch x context x (512 + 64) x 2
(bf16 latents, each read once per head block) / median time, against the device copy
bandwidth measured in the same run (read + write of 1 GiB; bar: >= 60%). The pool holds
the batch's latents at shuffled slots, 64 x 4096 x 1152 B = 302 MB, beyond L2. `--sweep`
also times the Triton kernel's (BLOCK_N, warps, stages) and split counts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from asgl.engine.contracts.forward_batch import ForwardBatch, ForwardMode  # noqa: E402
from asgl.engine.worker.latent_kv_cache import LatentKVPool  # noqa: E402
from asgl.kernels.attention import create_attention_backend  # noqa: E402
from asgl.kernels.triton.decode_attention import num_kv_splits  # noqa: E402
from asgl.kernels.triton.mla_decode import (mla_decode_attention, mla_decode_ref,  # noqa: E402
                                            mla_head_blocks)

DEV = torch.device("cuda")
DT = torch.bfloat16
# name: (heads, kv_lora_rank, rope dims)
SHAPES = {"deepseek-v2-lite": (16, 512, 64), "deepseek-v3": (128, 512, 64),
          "minicpm3-4b": (40, 256, 32)}


def _record(out: str | None, rec: dict) -> None:
    print(json.dumps(rec))
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")


def _bench(fn) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device copy, counting read + write."""
    src = torch.randn(2**29, device=DEV, dtype=DT)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / ms / 1e6


class DecodeCase:
    """A decode step's inputs: a latent pool with every request's tokens at shuffled
    slots, req_to_token, absorbed queries, and a ForwardBatch for the backends."""

    def __init__(self, H: int, Dl: int, Dr: int, seqs: list[int], gen: torch.Generator):
        self.H, self.Dl, self.Dr, self.seqs = H, Dl, Dr, seqs
        B, total = len(seqs), sum(seqs)
        self.pool = LatentKVPool(total + 1, 1, Dl, Dr, DT, DEV)
        self.pool.buffers[0].normal_(generator=gen)
        perm = torch.randperm(total + 1, device=DEV, generator=gen) + 1
        self.table = torch.zeros(B, max(seqs) + 1, dtype=torch.int64, device=DEV)
        off = 0
        for i, s in enumerate(seqs):
            self.table[i, :s] = perm[off:off + s]
            off += s
        self.q = torch.randn(B, H, Dl + Dr, device=DEV, dtype=DT, generator=gen)
        self.scale = 0.1147  # V2-Lite's (192^-0.5 x YaRN mscale^2)
        self.rows = torch.arange(B, device=DEV)
        self.seq_t = torch.tensor(seqs, device=DEV)

    def batch(self, backend) -> ForwardBatch:
        """The decode batch whose new token (position seq-1) is already in the pool: the
        backend rewrites it with the same latent."""
        B = len(self.seqs)
        last = self.table[self.rows, self.seq_t - 1]
        self.new_latent = self.pool.buffers[0][last, 0].clone()
        return ForwardBatch.build(
            mode=ForwardMode.DECODE, input_ids=[0] * B, positions=[s - 1 for s in self.seqs],
            out_cache_loc=last, req_pool_indices=list(range(B)),
            prefix_lens=[s - 1 for s in self.seqs], extend_lens=[1] * B,
            logits_rows=list(range(B)), sample_rows=list(range(B)), device=DEV,
            req_to_token=self.table, kv_pool=self.pool, attn_backend=backend)

    def triton(self, num_splits: int, config=None):
        out = torch.empty(len(self.seqs), self.H, self.Dl, device=DEV, dtype=DT)
        return lambda: mla_decode_attention(self.q, self.pool.buffers[0], out, self.table,
                                            self.rows, self.seq_t, kv_lora_rank=self.Dl,
                                            sm_scale=self.scale, num_splits=num_splits,
                                            config=config)

    def flashinfer(self):
        from asgl.layers.mla import LatentAttention
        spec = LatentAttention(self.H, 128, self.Dr, 128, self.Dl, self.scale, 0).spec
        backend = create_attention_backend(
            "flashinfer_mla", device=DEV, num_heads=self.H, kv_lora_rank=self.Dl,
            rope_dim=self.Dr, sm_scale=self.scale, dtype=DT)
        backend.check_spec(spec)
        batch = self.batch(backend)
        q = self.q.reshape(len(self.seqs), -1)
        lat = self.new_latent
        return lambda: backend.forward(q, lat, lat[:, :self.Dl], spec, batch)

    def reference(self) -> torch.Tensor:
        return mla_decode_ref(self.q, self.pool.buffers[0], self.table,
                              list(range(len(self.seqs))), self.seqs, kv_lora_rank=self.Dl,
                              sm_scale=self.scale)

    def latent_bytes(self) -> int:
        return sum(self.seqs) * (self.Dl + self.Dr) * 2


def _err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.reshape(ref.shape).double()
    return float((out - ref.double()).norm() / ref.double().norm())


def check(args) -> int:
    gen = torch.Generator(device=DEV).manual_seed(0)
    failed = total = 0
    seq_sets = [[1, 17, 300, 4097], [4096] * 8, [1] * 64, [129, 2000, 31, 8191]]
    for (name, (H, Dl, Dr)), seqs in itertools.product(SHAPES.items(), seq_sets):
        case = DecodeCase(H, Dl, Dr, seqs, gen)
        ref = case.reference()
        splits = num_kv_splits(len(seqs), mla_head_blocks(H), max(seqs))
        runs = {"triton": case.triton(splits)}
        try:
            runs["flashinfer"] = case.flashinfer()
        except (ImportError, NotImplementedError) as exc:
            print(f"[check] SKIP flashinfer {name}: {exc}")
        for kernel, fn in runs.items():
            out = fn()
            err = _err(out, ref)
            ok = err < 1e-2 and not torch.isnan(out).any()
            failed, total = failed + (not ok), total + 1
            print(f"[check] {'PASS' if ok else 'FAIL'} mla_decode {kernel} {name} "
                  f"seqs={seqs[:4]}{'...' if len(seqs) > 4 else ''} rel_err={err:.2e}")
            _record(args.out, {"bench": "mla_check", "kernel": kernel, "shape": name,
                               "seqs": seqs, "rel_err": err, "pass": ok})
    print(f"[check] mla: {total - failed}/{total} passed")
    return 1 if failed else 0


def bench(args) -> int:
    gbs = copy_bandwidth()
    print(f"[bench] device copy bandwidth {gbs:.0f} GB/s ({torch.cuda.get_device_name()})")
    gen = torch.Generator(device=DEV).manual_seed(1)
    below = 0
    for name in args.shape:
        H, Dl, Dr = SHAPES[name]
        case = DecodeCase(H, Dl, Dr, [args.context] * args.batch, gen)
        nbytes = case.latent_bytes()
        default = num_kv_splits(args.batch, mla_head_blocks(H), args.context)
        variants = {f"triton splits={default}": case.triton(default)}
        if args.sweep:
            for splits, (bn, warps, stages) in itertools.product(
                    (1, 2, 4, 8, 16), ((16, 4, 2), (32, 4, 2), (32, 8, 2), (64, 8, 2),
                                       (32, 4, 3), (16, 4, 3))):
                variants[f"triton splits={splits} bn={bn} w={warps} s={stages}"] = \
                    case.triton(splits, (16, bn, warps, stages))
        try:
            variants["flashinfer"] = case.flashinfer()
        except (ImportError, NotImplementedError) as exc:
            print(f"[bench] SKIP flashinfer: {exc}")
        for label, fn in variants.items():
            try:
                ms = _bench(fn)
            except Exception as exc:  # a sweep config that does not fit (shared memory)
                print(f"[bench] {name} {label}: {type(exc).__name__}: {exc}"[:200])
                continue
            rate = nbytes / ms / 1e6
            frac = rate / gbs
            main = " bn=" not in label  # the served configuration, not a sweep point
            if main and frac < 0.6:
                below += 1
            print(f"[bench] mla_decode {name} {label} B={args.batch} ctx={args.context}: "
                  f"{ms * 1e3:.0f} us, {rate:.0f} GB/s of latents = {100 * frac:.0f}% of "
                  f"copy bandwidth{'' if frac >= 0.6 else ' (below the 60% bar)'}")
            _record(args.out, {"bench": "mla_decode", "shape": name, "variant": label,
                               "batch": args.batch, "context": args.context, "ms": ms,
                               "gbs": rate, "copy_gbs": gbs, "fraction": frac})
    print(f"[bench] mla: {below} served kernel(s) below the 60% bar")
    return 0


def model_check(args) -> int:
    import tempfile

    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # for helpers
    from tests.conftest import make_llm
    from tests.test_model_families import _LogitsTap

    config = transformers.DeepseekV2Config(
        vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=3,
        num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=1,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
        n_shared_experts=1, topk_method="greedy", routed_scaling_factor=1.0,
        max_position_embeddings=8192, initializer_range=0.02, bos_token_id=1, eos_token_id=999,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                         "original_max_position_embeddings": 1024, "mscale": 0.707,
                         "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1})
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    hf = hf.float().eval()
    path = tempfile.mkdtemp()
    hf.save_pretrained(path)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(2, 998, (300,), generator=gen).tolist()
    prompt2 = prompt[:200] + torch.randint(2, 998, (50,), generator=gen).tolist()
    failed = 0
    cases = [("float32", "torch", 1e-3), ("float32", "triton", 1e-3),
             ("bfloat16", "triton", 5e-2), ("bfloat16", "flashinfer", 5e-2)]
    for dtype, backend, tol in cases[:args.cases]:
        try:
            llm = make_llm(model_path=path, dtype=dtype, device=args.device,
                           chunked_prefill_size=64, skip_tokenizer_init=True, max_total_tokens=4096,
                           attention_backend=backend, debug_check_integrity=False)
        except (ImportError, NotImplementedError) as exc:
            print(f"[check] SKIP model {backend} {dtype}: {exc}")
            continue
        try:
            runner = llm.engine.runner
            graphs = runner.graph_runner is not None
            for i, ids in enumerate((prompt, prompt2)):
                tap = _LogitsTap(runner.model)
                # the first prompt: logits of every prompt row (prompt logprobs); the
                # second: its last prompt row and the decode rows
                extra = dict(return_logprob=True, logprob_start_len=0) if i == 0 else {}
                out = llm.generate(ids, {"temperature": 0.0, "max_new_tokens": 8,
                                         "ignore_eos": True}, **extra)
                got = tap.take()
                seq = ids + out.output_ids
                with torch.no_grad():
                    want = hf(torch.tensor([seq[:-1]])).logits[0].float()
                want = want if i == 0 else want[len(ids) - 1:]
                err = float((got.cpu().double() - want.double()).norm() / want.double().norm())
                ok = err < tol and got.shape == want.shape
                failed += not ok
                print(f"[check] {'PASS' if ok else 'FAIL'} model deepseek-v2 {backend} {dtype} "
                      f"prompt {i + 1} (cached {out.cached_tokens}) graphs={graphs} "
                      f"rows={got.shape[0]} rel_err={err:.2e}")
                _record(args.out, {"bench": "mla_model_check", "backend": backend,
                                   "dtype": dtype, "prompt": i + 1, "graphs": graphs,
                                   "cached": out.cached_tokens, "rel_err": err, "pass": ok})
        finally:
            llm.shutdown()
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["check", "bench", "model"])
    parser.add_argument("--out", default=None, help="append JSON records to this file")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--shape", nargs="+", default=["deepseek-v2-lite", "deepseek-v3"],
                        choices=list(SHAPES))
    parser.add_argument("--sweep", action="store_true", help="also time Triton configs")
    parser.add_argument("--device", default="cuda", help="model: where the engine runs")
    parser.add_argument("--cases", type=int, default=4, help="model: run the first N of "
                        "(fp32 torch, fp32 triton, bf16 triton, bf16 flashinfer)")
    args = parser.parse_args()
    torch.manual_seed(0)
    return {"check": check, "bench": bench, "model": model_check}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
