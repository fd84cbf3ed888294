"""The torch attention backend against a naive float64 reference on random inputs."""

import math

import pytest
import torch

from asgl.kernels.attention import create_attention_backend
from asgl.engine.contracts.attention import AttentionSpec
from helpers import Pools, encoder_batch


def reference(q, k, v, q_start, spec):
    """Float64 attention of queries at key positions q_start.. over keys 0..s-1."""
    q, k, v = q.double(), k.double(), v.double()
    group = spec.num_heads // spec.num_kv_heads
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("nhd,shd->hns", q, k) * spec.scaling
    if spec.logit_cap:
        scores = spec.logit_cap * torch.tanh(scores / spec.logit_cap)
    n, s = q.shape[0], k.shape[0]
    allowed = torch.ones(n, s, dtype=torch.bool)
    for i in range(n):
        for j in range(s):
            dist = q_start + i - j
            if spec.causal and dist < 0:
                allowed[i, j] = False
            if spec.sliding_window is not None and abs(dist) >= spec.sliding_window:
                allowed[i, j] = False
    scores = scores.masked_fill(~allowed, -math.inf)
    return torch.einsum("hns,shd->nhd", scores.softmax(-1), v)


def quantize(x, scale, dtype):
    """What the pool returns for x: stored as x / scale in `dtype`, read back times scale."""
    if scale is None:
        return x.to(dtype).double()
    return (x / scale).to(dtype).double() * scale


# (prefix_len, extend_len): a fresh prefill, a prefix hit / later chunk, decodes, a
# single-token prompt, and another chunk.
MIXED = [(0, 7), (5, 4), (9, 1), (0, 1), (12, 3), (3, 1)]
CASES = {
    "gqa": dict(H=8, Hkv=2, D=64),
    "mha": dict(H=4, Hkv=4, D=32),
    "mqa_d256": dict(H=2, Hkv=1, D=256),
    "window": dict(H=4, Hkv=2, D=32, sliding_window=4),
    "softcap": dict(H=4, Hkv=2, D=32, logit_cap=2.0),
    "softcap_window": dict(H=4, Hkv=1, D=64, logit_cap=5.0, sliding_window=3),
    "v_dim": dict(H=4, Hkv=2, D=32, Dv=48),
    "fp8": dict(H=4, Hkv=2, D=32, kv_dtype=torch.float8_e4m3fn, k_scale=0.5, v_scale=2.0),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("reqs", [MIXED, [(4, 1), (11, 1), (1, 1)]], ids=["mixed", "decode"])
def test_paged_against_reference(name, reqs):
    c = dict(CASES[name])
    H, Hkv, D = c.pop("H"), c.pop("Hkv"), c.pop("D")
    Dv, kv_dtype = c.pop("Dv", D), c.pop("kv_dtype", torch.float32)
    spec = AttentionSpec(layer_id=1, num_heads=H, num_kv_heads=Hkv, head_dim=D,
                         scaling=D ** -0.5, v_head_dim=Dv if Dv != D else None, **c)
    gen = torch.Generator().manual_seed(0)
    pools = Pools(2, Hkv, D, capacity=128, dtype=kv_dtype, shuffle=gen, v_head_dim=Dv)

    seqs, prefix_kv = [], []
    for prefix, _ in reqs:  # K/V of cached prefixes, written straight into the pool
        seq = pools.new_seq()
        kp = torch.randn(prefix, Hkv, D, generator=gen)
        vp = torch.randn(prefix, Hkv, Dv, generator=gen)
        if prefix:
            slots = pools.allocator.alloc(prefix)
            pools.req_to_token.write(seq.row, 0, slots)
            pools.kv.set_kv(1, slots, kp, vp, spec.k_scale, spec.v_scale)
            seq.cached = prefix
        seqs.append(seq)
        prefix_kv.append((kp, vp))
    batch = pools.build(seqs, [[0] * ext for _, ext in reqs])
    T = batch.num_tokens
    q = torch.randn(T, H * D, generator=gen) * 2
    k = torch.randn(T, Hkv * D, generator=gen)
    v = torch.randn(T, Hkv * Dv, generator=gen)

    out = batch.attn_backend.forward(q, k, v, spec, batch)
    assert out.shape == (T, H * Dv) and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    out = out.view(T, H, Dv)
    start = 0
    for (prefix, ext), (kp, vp) in zip(reqs, prefix_kv):
        rows = slice(start, start + ext)
        k_all = torch.cat([kp, k[rows].view(ext, Hkv, D)])
        v_all = torch.cat([vp, v[rows].view(ext, Hkv, Dv)])
        ref = reference(q[rows].view(ext, H, D), quantize(k_all, spec.k_scale, kv_dtype),
                        quantize(v_all, spec.v_scale, kv_dtype), prefix, spec)
        torch.testing.assert_close(out[rows].double(), ref, atol=2e-5, rtol=1e-5)
        start += ext
    # The new tokens' K/V landed in their slots.
    stored_k, _ = pools.kv.get_kv(1)
    expect = quantize(k.view(T, Hkv, D), spec.k_scale, kv_dtype)
    assert torch.equal(stored_k[batch.out_cache_loc].double() * (spec.k_scale or 1), expect)


@pytest.mark.parametrize("causal,window", [(False, None), (False, 3), (True, None)])
def test_encoder_mode(causal, window):
    H, Hkv, D = 4, 2, 32
    spec = AttentionSpec(layer_id=0, num_heads=H, num_kv_heads=Hkv, head_dim=D,
                         scaling=D ** -0.5, causal=causal, sliding_window=window)
    lengths = [5, 1, 9]
    batch = encoder_batch(lengths)
    gen = torch.Generator().manual_seed(1)
    T = sum(lengths)
    q, k, v = (torch.randn(T, n * D, generator=gen) for n in (H, Hkv, Hkv))
    out = batch.attn_backend.forward(q, k, v, spec, batch).view(T, H, D)
    assert torch.isfinite(out).all()
    start = 0
    for n in lengths:
        rows = slice(start, start + n)
        ref = reference(q[rows].view(n, H, D), k[rows].view(n, Hkv, D),
                        v[rows].view(n, Hkv, D), 0, spec)
        torch.testing.assert_close(out[rows].double(), ref, atol=2e-5, rtol=1e-5)
        start += n


def test_bf16_inputs_stay_bf16():
    H, Hkv, D = 4, 2, 64
    spec = AttentionSpec(layer_id=0, num_heads=H, num_kv_heads=Hkv, head_dim=D, scaling=D ** -0.5)
    pools = Pools(1, Hkv, D, capacity=64, dtype=torch.bfloat16)
    seqs = [pools.new_seq(), pools.new_seq()]
    batch = pools.build(seqs, [[0] * 6, [0] * 3])
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(9, n * D, generator=gen).bfloat16() for n in (H, Hkv, Hkv))
    out = batch.attn_backend.forward(q, k, v, spec, batch)
    assert out.dtype == torch.bfloat16
    ref = reference(q[:6].view(6, H, D), k[:6].view(6, Hkv, D), v[:6].view(6, Hkv, D), 0, spec)
    torch.testing.assert_close(out[:6].view(6, H, D).double(), ref, atol=2e-2, rtol=2e-2)


def test_unknown_backend_names_choices():
    with pytest.raises(ValueError, match="torch"):
        create_attention_backend("nope")
