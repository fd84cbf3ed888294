"""Our Triton kernels against their torch references on fresh random inputs.

On a machine without CUDA they run under Triton's interpreter (TRITON_INTERPRET=1, set here
before triton is imported) on small shapes; on a GPU the same tests run compiled, with
longer sequences so that every loop of the attention kernels is exercised. Outputs are
poisoned with NaN first, so an element the kernel fails to write fails the test.
Tolerances: ‖out − ref‖ / ‖ref‖ < 1e-2 for bf16 against a float32 reference, 1e-4 for
float32 (IEEE dots).
"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed")

from asgl.engine.contracts.forward_batch import ForwardBatch, ForwardMode  # noqa: E402
from asgl.engine.scheduler.slots import ReqToTokenPool, TokenSlotAllocator
from asgl.engine.worker.kv_cache import KVPool  # noqa: E402
from asgl.kernels.attention import create_attention_backend  # noqa: E402
from asgl.engine.contracts.attention import AttentionSpec  # noqa: E402
from asgl.kernels.triton.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from asgl.kernels.triton.decode_attention import (decode_attention,  # noqa: E402
                                                  decode_attention_ref)
from asgl.kernels.triton.extend_attention import (build_schedule, extend_attention,  # noqa: E402
                                                  extend_attention_ref, tokens_per_block)
from asgl.kernels.triton.norm import rmsnorm, rmsnorm_ref  # noqa: E402
from asgl.kernels.triton.rotary import rotary_embedding, rotary_ref  # noqa: E402
from asgl.kernels.triton.kv_store import can_store, store_kv, store_kv_ref  # noqa: E402
from asgl.layers import fused  # noqa: E402
from asgl.layers.activation import SiluAndMul  # noqa: E402
from asgl.layers.norm import RMSNorm  # noqa: E402
from asgl.layers.rotary import RotaryEmbedding  # noqa: E402

DEV = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}

# (prefix_len, extend_len): fresh prefill, prefix hit, decodes, a one-token prompt, chunks.
# On the GPU the long entries make the unmasked and masked key loops both run (64-key tiles).
MIXED = [(0, 7), (5, 4), (9, 1), (0, 1), (12, 3), (20, 30)]
if ON_GPU:
    MIXED += [(300, 150), (0, 200), (129, 1)]
DECODE_SEQS = [1, 17, 45, 64] + ([1000, 4097, 300] if ON_GPU else [])

ATTN_CASES = {
    "gqa": dict(H=8, Hkv=2, D=64),
    "mha": dict(H=4, Hkv=4, D=32),
    "mqa_d256": dict(H=2, Hkv=1, D=256),
    "group3_d80_dv48": dict(H=6, Hkv=2, D=80, Dv=48),
    "window": dict(H=4, Hkv=2, D=32, window=5),
    "softcap_window": dict(H=4, Hkv=1, D=64, cap=5.0, window=3),
    "fp8": dict(H=4, Hkv=2, D=32, kv_dtype=torch.float8_e4m3fn, k_scale=0.5, v_scale=2.0),
}
if ON_GPU:
    ATTN_CASES["llama8b"] = dict(H=32, Hkv=8, D=128)
    ATTN_CASES["window_long"] = dict(H=8, Hkv=2, D=128, window=100)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not torch.isnan(out).any(), "NaN (or an unwritten element) in the output"
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.2e}"


def _case(name: str, dtype: torch.dtype):
    c = dict(ATTN_CASES[name])
    H, Hkv, D = c.pop("H"), c.pop("Hkv"), c.pop("D")
    Dv = c.pop("Dv", D)
    kv_dtype = c.pop("kv_dtype", dtype)
    if kv_dtype != dtype and dtype == torch.float32:
        pytest.skip("fp8 KV caches serve bf16 models")
    kw = dict(sliding_window=c.pop("window", None), logit_cap=c.pop("cap", 0.0),
              k_scale=c.pop("k_scale", None), v_scale=c.pop("v_scale", None))
    return H, Hkv, D, Dv, kv_dtype, kw


def _random_pool(seq_lens: list[int], Hkv: int, D: int, Dv: int, kv_dtype: torch.dtype,
                 gen: torch.Generator):
    """K/V buffers with one shuffled run of slots per request in a req_to_token table."""
    total = sum(seq_lens)
    slots = torch.randperm(total + 7, generator=gen)[:total] + 1  # slot 0 is padding
    k_buf = torch.randn(total + 8, Hkv, D, generator=gen).to(kv_dtype)
    v_buf = torch.randn(total + 8, Hkv, Dv, generator=gen).to(kv_dtype)
    rows = list(range(len(seq_lens)))[::-1]  # request i lives in row B-1-i
    r2t = torch.zeros(len(seq_lens), max(seq_lens) + 5, dtype=torch.int64)
    off = 0
    for row, n in zip(rows, seq_lens):
        r2t[row, :n] = slots[off:off + n]
        off += n
    return k_buf.to(DEV), v_buf.to(DEV), r2t.to(DEV), rows


def _ivec(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=DEV)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_extend_attention(name, dtype):
    H, Hkv, D, Dv, kv_dtype, kw = _case(name, dtype)
    gen = torch.Generator().manual_seed(hash(name) % 1000)
    prefix = [p for p, _ in MIXED]
    ext = [e for _, e in MIXED]
    k_buf, v_buf, r2t, rows = _random_pool([p + e for p, e in MIXED], Hkv, D, Dv, kv_dtype, gen)
    T = sum(ext)
    q = (torch.randn(T, H, D, generator=gen) * 2).to(dtype).to(DEV)
    out = torch.full((T, H, Dv), float("nan"), dtype=dtype, device=DEV)
    starts = [sum(ext[:i]) for i in range(len(ext))]
    sched = build_schedule(ext, tokens_per_block(D, Dv, H // Hkv, dtype), DEV)
    extend_attention(q, k_buf, v_buf, out, r2t, _ivec(rows), _ivec(prefix), _ivec(ext),
                     _ivec(starts), sched, sm_scale=D ** -0.5, **kw)
    ref = extend_attention_ref(q, k_buf, v_buf, r2t, rows, prefix, ext, sm_scale=D ** -0.5, **kw)
    check(out, ref, dtype)


@pytest.mark.parametrize("window", [None, 4])
def test_extend_attention_no_cache_non_causal(window):
    """Encoder mode: K/V are the new tokens themselves, bidirectional."""
    H, Hkv, D = 4, 2, 32
    lens = [5, 1, 19] + ([300] if ON_GPU else [])
    gen = torch.Generator().manual_seed(3)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, D, generator=gen).to(DEV) for h in (H, Hkv, Hkv))
    out = torch.full((T, H, D), float("nan"), device=DEV)
    zeros = [0] * len(lens)
    starts = [sum(lens[:i]) for i in range(len(lens))]
    sched = build_schedule(lens, tokens_per_block(D, D, H // Hkv, q.dtype), DEV)
    extend_attention(q, k, v, out, None, None, _ivec(zeros), _ivec(lens), _ivec(starts), sched,
                     sm_scale=D ** -0.5, causal=False, sliding_window=window)
    ref = extend_attention_ref(q, k, v, None, None, zeros, lens, sm_scale=D ** -0.5,
                               causal=False, sliding_window=window)
    check(out, ref, torch.float32)


@pytest.mark.parametrize("splits", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_decode_attention(name, dtype, splits):
    if splits == 8 and name not in ("gqa", "llama8b"):
        pytest.skip("many splits: checked on the GQA shapes only")
    if splits == 1 and name not in ("gqa", "mha") and not ON_GPU:
        pytest.skip("one split: checked on two shapes on the CPU")
    H, Hkv, D, Dv, kv_dtype, kw = _case(name, dtype)
    gen = torch.Generator().manual_seed(hash(name) % 1000 + splits)
    k_buf, v_buf, r2t, rows = _random_pool(DECODE_SEQS, Hkv, D, Dv, kv_dtype, gen)
    B = len(DECODE_SEQS)
    q = (torch.randn(B, H, D, generator=gen) * 2).to(dtype).to(DEV)
    out = torch.full((B, H, Dv), float("nan"), dtype=dtype, device=DEV)
    decode_attention(q, k_buf, v_buf, out, r2t, _ivec(rows), _ivec(DECODE_SEQS),
                     sm_scale=D ** -0.5, num_splits=splits, **kw)
    ref = decode_attention_ref(q, k_buf, v_buf, r2t, rows, DECODE_SEQS, sm_scale=D ** -0.5, **kw)
    check(out, ref, dtype)


# -- the backend, through a real ForwardBatch and KV pool ---------------------------------

def _backend_batch(reqs: list[tuple[int, int]], Hkv: int, D: int, kv_dtype: torch.dtype,
                   spec: AttentionSpec, gen: torch.Generator, **backend_kw):
    capacity = sum(p + e for p, e in reqs) + 16
    pool = KVPool(capacity, 1, Hkv, D, kv_dtype, DEV)
    table = ReqToTokenPool(len(reqs) + 1, max(p + e for p, e in reqs) + 4, DEV)
    alloc = TokenSlotAllocator(capacity)
    alloc.free(alloc.alloc(capacity)[torch.randperm(capacity, generator=gen)])  # shuffle
    rows, locs, positions = [], [], []
    for prefix, ext in reqs:
        row = table.alloc()
        if prefix:
            slots = alloc.alloc(prefix)
            table.write(row, 0, slots)
            pool.set_kv(0, slots.to(DEV), torch.randn(prefix, Hkv, D, generator=gen).to(DEV),
                        torch.randn(prefix, Hkv, D, generator=gen).to(DEV),
                        spec.k_scale, spec.v_scale)
        new = alloc.alloc(ext)
        table.write(row, prefix, new)
        rows.append(row)
        locs.append(new)
        positions += range(prefix, prefix + ext)
    decode = all(p > 0 and e == 1 for p, e in reqs)
    mode = ForwardMode.DECODE if decode else ForwardMode.MIXED
    return ForwardBatch.build(
        mode=mode, input_ids=[0] * len(positions), positions=positions,
        out_cache_loc=torch.cat(locs), req_pool_indices=rows,
        prefix_lens=[p for p, _ in reqs], extend_lens=[e for _, e in reqs], logits_rows=[],
        sample_rows=[], device=DEV, req_to_token=table.req_to_token, kv_pool=pool,
        attn_backend=create_attention_backend("triton", **backend_kw))


BACKEND_CASES = {
    "mixed": (MIXED, {}),
    "decode": ([(4, 1), (40, 1), (1, 1)] + ([(2000, 1)] if ON_GPU else []), {}),
    "decode_3_splits": ([(4, 1), (40, 1), (1, 1)], {"num_kv_splits": 3}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("fp8", [False, True], ids=["kv16", "kv8"])
@pytest.mark.parametrize("case", list(BACKEND_CASES))
def test_backend(case, fp8, dtype):
    if fp8 and dtype == torch.float32:
        pytest.skip("fp8 KV caches serve bf16 models")
    reqs, backend_kw = BACKEND_CASES[case]
    H, Hkv, D = 8, 2, 64
    kv_dtype = torch.float8_e4m3fn if fp8 else dtype
    scales = dict(k_scale=0.5, v_scale=2.0) if fp8 else {}
    spec = AttentionSpec(layer_id=0, num_heads=H, num_kv_heads=Hkv, head_dim=D,
                         scaling=D ** -0.5, **scales)
    gen = torch.Generator().manual_seed(5)
    batch = _backend_batch(reqs, Hkv, D, kv_dtype, spec, gen, **backend_kw)
    T = batch.num_tokens
    q, k, v = ((torch.randn(T, h * D, generator=gen) * s).to(dtype).to(DEV)
               for h, s in ((H, 2), (Hkv, 1), (Hkv, 1)))
    out = batch.attn_backend.forward(q, k, v, spec, batch)
    assert out.shape == (T, H * D) and out.dtype == dtype
    k_buf, v_buf = batch.kv_pool.get_kv(0)
    # The new K/V landed in their slots (as the pool stores them).
    stored = k_buf[batch.out_cache_loc].float() * (spec.k_scale or 1.0)
    expect = (k.view(T, Hkv, D).float() / (spec.k_scale or 1.0)).to(kv_dtype).float() \
        * (spec.k_scale or 1.0)
    assert torch.equal(stored, expect)
    ref = extend_attention_ref(q.view(T, H, D), k_buf, v_buf, batch.req_to_token,
                               batch.req_pool_indices.tolist(), batch.prefix_lens_cpu,
                               batch.extend_lens_cpu, sm_scale=spec.scaling, **scales)
    check(out.view(T, H, D), ref, dtype)


def test_backend_encoder():
    H, Hkv, D, lens = 4, 2, 32, [5, 1, 9]
    spec = AttentionSpec(layer_id=0, num_heads=H, num_kv_heads=Hkv, head_dim=D,
                         scaling=D ** -0.5, causal=False)
    batch = ForwardBatch.build(
        mode=ForwardMode.ENCODE, input_ids=[0] * sum(lens),
        positions=[p for n in lens for p in range(n)], out_cache_loc=None,
        req_pool_indices=[0] * len(lens), prefix_lens=[0] * len(lens), extend_lens=lens,
        logits_rows=[], sample_rows=[], device=DEV,
        attn_backend=create_attention_backend("triton"))
    gen = torch.Generator().manual_seed(6)
    T = sum(lens)
    q, k, v = (torch.randn(T, h * D, generator=gen).to(DEV) for h in (H, Hkv, Hkv))
    out = batch.attn_backend.forward(q, k, v, spec, batch)
    ref = extend_attention_ref(q.view(T, H, D), k.view(T, Hkv, D), v.view(T, Hkv, D), None,
                               None, [0] * len(lens), lens, sm_scale=spec.scaling, causal=False)
    check(out.view(T, H, D), ref, torch.float32)


# -- fused elementwise kernels ------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("hidden", [96, 1024] + ([4096] if ON_GPU else []))
def test_rmsnorm(hidden, gemma, dtype):
    gen = torch.Generator().manual_seed(hidden)
    rows = 37 if ON_GPU else 5
    x, res = (torch.randn(rows, hidden, generator=gen).to(dtype).to(DEV) for _ in range(2))
    w = (torch.randn(hidden, generator=gen) * 0.5 + (0 if gemma else 1)).to(dtype).to(DEV)
    eps = 1e-6
    # Plain norm.
    check(rmsnorm(x, w, eps, gemma=gemma), rmsnorm_ref(x.float(), w.float(), eps, gemma=gemma),
          dtype)
    # Fused add + norm, out of place then in place.
    y, s = rmsnorm(x, w, eps, res, gemma=gemma)
    ref_s = (x.float() + res.float()).to(dtype)
    if ON_GPU:
        assert torch.equal(s, ref_s)
    else:  # the interpreter rounds float32 -> bf16 toward zero, not to nearest
        check(s, ref_s, dtype)
    check(y, rmsnorm_ref(ref_s.float(), w.float(), eps, gemma=gemma), dtype)
    x2, res2 = x.clone(), res.clone()
    y2, s2 = rmsnorm(x2, w, eps, res2, gemma=gemma, inplace=True)
    assert y2.data_ptr() == x2.data_ptr() and s2.data_ptr() == res2.data_ptr()
    assert torch.equal(y2, y) and torch.equal(s2, s)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim", [64, 32], ids=["full", "partial"])
def test_rotary(rotary_dim, neox, dtype, monkeypatch):
    head_dim, Hq, Hk = 64, 6, 2
    T = 50 if ON_GPU else 9
    llama3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=64)
    rope = RotaryEmbedding(head_dim, rotary_dim, 512, 500000.0, neox, llama3)
    cache = rope.cos_sin_cache.to(DEV)
    gen = torch.Generator().manual_seed(rotary_dim + neox)
    pos = torch.randint(0, 512, (T,), generator=gen).to(DEV)
    # q and k as views into one fused qkv row, as a model produces them.
    qkv = torch.randn(T, (Hq + 2 * Hk) * head_dim, generator=gen).to(dtype).to(DEV)
    q, k = qkv[:, :Hq * head_dim], qkv[:, Hq * head_dim:(Hq + Hk) * head_dim]
    ref_q, ref_k = rotary_ref(pos, q, k, cache, head_dim, neox)
    v_before = qkv[:, (Hq + Hk) * head_dim:].clone()
    q_in, k_in = q.clone(), k.clone()
    rotary_embedding(pos, q, k, cache, head_dim, neox)
    check(q, ref_q, dtype)
    check(k, ref_k, dtype)
    # Dims past rotary_dim and the v part are untouched.
    q3, ref_q3 = q.reshape(T, Hq, head_dim), ref_q.view(T, Hq, head_dim)
    assert torch.equal(q3[..., rotary_dim:], ref_q3[..., rotary_dim:].to(dtype))
    assert torch.equal(qkv[:, (Hq + Hk) * head_dim:], v_before)
    # The torch layer (which rounds in the activation dtype) agrees too.
    monkeypatch.setattr(fused, "FORCE", False)
    layer_q, layer_k = rope.to(DEV)(pos, q_in, k_in)
    check(q, layer_q, dtype)
    check(k, layer_k, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(5, 96), (3, 3000)] + ([(300, 14336)] if ON_GPU else []))
def test_silu_and_mul(shape, dtype):
    rows, d = shape
    gen = torch.Generator().manual_seed(d)
    x = (torch.randn(rows, 2 * d, generator=gen) * 3).to(dtype).to(DEV)
    out = torch.full((rows, d), float("nan"), dtype=dtype, device=DEV)
    y = silu_and_mul(x, out=out)
    assert y.data_ptr() == out.data_ptr()
    check(y, silu_and_mul_ref(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_store_kv(dtype):
    Hkv, D, T, num_slots = 2, 64, (40 if ON_GPU else 6), 64
    gen = torch.Generator().manual_seed(T)
    qkv = torch.randn(T, (4 + 2 * Hkv) * D, generator=gen).to(dtype).to(DEV)
    k = qkv[:, 4 * D:(4 + Hkv) * D].view(T, Hkv, D)  # strided token rows, as in a model
    v = qkv[:, (4 + Hkv) * D:].view(T, Hkv, D)
    slots = (torch.randperm(num_slots - 1, generator=gen)[:T] + 1).to(DEV)
    k_buf = torch.full((num_slots, Hkv, D), float("nan"), dtype=dtype, device=DEV)
    v_buf = k_buf.clone()
    assert can_store(k, v, k_buf, v_buf)
    store_kv(k, v, k_buf, v_buf, slots)
    k_ref, v_ref = k_buf.clone(), v_buf.clone()
    store_kv_ref(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_buf[slots], k) and torch.equal(v_buf[slots], v)
    untouched = torch.ones(num_slots, dtype=torch.bool, device=DEV)
    untouched[slots] = False
    assert torch.isnan(k_buf[untouched]).all() and torch.isnan(v_buf[untouched]).all()
    assert not can_store(k.float() if dtype != torch.float32 else k.half(), v, k_buf, v_buf)


def test_layers_dispatch_to_fused_kernels(monkeypatch):
    """The layers' fused path (Triton) against their torch path, bf16, same inputs."""
    dtype, T, hidden = torch.bfloat16, 5, 96
    gen = torch.Generator().manual_seed(3)

    def both(fn):
        monkeypatch.setattr(fused, "FORCE", False)
        ref = fn()
        monkeypatch.setattr(fused, "FORCE", True)
        return fn(), ref

    norm = RMSNorm(hidden, 1e-5, params_dtype=dtype).to(DEV)
    norm.weight.data = (torch.rand(hidden, generator=gen) + 0.5).to(dtype).to(DEV)
    x, res = (torch.randn(T, hidden, generator=gen).to(dtype).to(DEV) for _ in range(2))
    out, ref = both(lambda: norm(x))
    check(out, ref.float(), dtype)
    (out, out_res), (ref, ref_res) = both(lambda: norm(x, res))
    check(out, ref.float(), dtype)
    check(out_res, ref_res.float(), dtype)

    up = torch.randn(T, 2 * hidden, generator=gen).to(dtype).to(DEV)
    out, ref = both(lambda: SiluAndMul()(up))
    check(out, ref.float(), dtype)

    rope = RotaryEmbedding(32, 32, 64, 10000.0).to(DEV)
    pos = torch.randint(0, 64, (T,), generator=gen).to(DEV)
    qkv = torch.randn(T, 6 * 32, generator=gen).to(dtype).to(DEV)
    (q, k), (q_ref, k_ref) = both(lambda: rope(pos, qkv[:, :128].clone(), qkv[:, 128:160].clone()))
    check(q, q_ref.float(), dtype)
    check(k, k_ref.float(), dtype)

    def write():
        pool = KVPool(8, 1, 2, 16, dtype, DEV)
        kv = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).to(dtype).to(DEV)
        pool.set_kv(0, _ivec([5, 1, 7]), kv[:, :32].view(3, 2, 16), kv[:, 32:].view(3, 2, 16))
        return pool.get_kv(0)

    (kb, vb), (kb_ref, vb_ref) = both(write)
    assert torch.equal(kb, kb_ref) and torch.equal(vb, vb_ref)
