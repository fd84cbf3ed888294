"""The fused-MoE Triton kernels against the torch reference, on fresh random inputs.

On the CPU they run under Triton's interpreter (TRITON_INTERPRET=1, tests/conftest.py) at
small shapes; on a GPU the same tests run compiled over token counts up to 8,192, expert
counts up to 256 and top-k up to 8. Outputs are compared with the float32 reference on the
same (rounded) inputs: ||out - ref|| / ||ref|| < 1e-2 for bf16, 1e-4 for float32. (Under
the interpreter bf16 errors are ~6e-3: it truncates float32 -> bf16 instead of rounding to
nearest, which shrinks every stored value by half an ulp on average; a GPU rounds.)
The sort/align step is checked exactly: every (token, slot) pair appears once, in a row
block of its own expert, and padding fills the rest.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed")

from asgl.kernels.moe_torch import fused_experts_ref  # noqa: E402
from asgl.kernels.triton import fused_moe  # noqa: E402
from asgl.kernels.triton.fused_moe import fused_experts  # noqa: E402
from asgl.layers.moe.router import RouterConfig, select_experts  # noqa: E402
from helpers import rel_err  # noqa: E402

DEV = torch.device("cuda" if ON_GPU else "cpu")
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}

# (tokens, experts, top_k, hidden, intermediate)
CASES = [(1, 8, 2, 64, 96), (3, 16, 8, 32, 64), (17, 8, 1, 48, 40), (40, 64, 6, 32, 32),
         (9, 4, 4, 64, 48)]
if ON_GPU:
    CASES += [(1, 8, 2, 4096, 14336), (64, 128, 8, 2048, 768), (8192, 8, 2, 1024, 1792),
              (8192, 128, 8, 2048, 768), (512, 256, 8, 1024, 256), (257, 160, 6, 1536, 320),
              (2048, 64, 6, 2048, 1408)]


def _inputs(T, E, k, H, I, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    w13 = torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=gen) / I ** 0.5
    logits = torch.randn(T, E, generator=gen)
    weights, ids = select_experts(logits, RouterConfig(top_k=k, renormalize=True))
    return [t.to(DEV) for t in (x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,E,k,H,I", CASES, ids=[f"T{c[0]}-E{c[1]}-k{c[2]}" for c in CASES])
def test_fused_experts_matches_reference(T, E, k, H, I, dtype):
    x, w13, w2, weights, ids = _inputs(T, E, k, H, I, dtype, seed=T * 1000 + E + k)
    out = fused_experts(x, w13, w2, weights, ids)
    ref = fused_experts_ref(x.float(), w13.float(), w2.float(), weights, ids)
    assert out.dtype == dtype and out.shape == (T, H)
    assert not torch.isnan(out).any()
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_fused_experts_other_activations(activation):
    x, w13, w2, weights, ids = _inputs(6, 8, 2, 32, 32, torch.float32, seed=3)
    out = fused_experts(x, w13, w2, weights, ids, activation=activation)
    ref = fused_experts_ref(x, w13, w2, weights, ids, activation=activation)
    assert rel_err(out, ref) < 1e-4


def test_expert_parallel_map_skips_other_ranks():
    """Two EP ranks, each with half the experts: their partial outputs add up to the
    whole layer, and each equals the reference restricted to its experts."""
    T, E, k, H, I = 11, 8, 2, 32, 32
    x, w13, w2, weights, ids = _inputs(T, E, k, H, I, torch.float32, seed=4)
    whole = fused_experts_ref(x, w13, w2, weights, ids)
    total = torch.zeros_like(whole)
    for rank in range(2):
        emap = torch.full((E,), -1, dtype=torch.int32, device=DEV)
        emap[rank * 4:(rank + 1) * 4] = torch.arange(4, dtype=torch.int32, device=DEV)
        local13, local2 = w13[rank * 4:(rank + 1) * 4], w2[rank * 4:(rank + 1) * 4]
        part = fused_experts(x, local13, local2, weights, ids, expert_map=emap)
        ref = fused_experts_ref(x, local13, local2, weights, ids, expert_map=emap)
        assert rel_err(part, ref) < 1e-4
        total += part
    assert rel_err(total, whole) < 1e-4


ALIGN = [(1, 8, 2, 16), (13, 8, 3, 4), (50, 64, 8, 16), (7, 3, 3, 2), (30, 256, 8, 16),
         (300, 16, 1, 8)]


@pytest.mark.parametrize("path", ["small", "torch"])
@pytest.mark.parametrize("T,E,k,block", ALIGN)
def test_align_block_size_exact(T, E, k, block, path):
    """Both paths (one Triton program for decode-sized batches, torch's device sort
    beyond) give exactly the stable expert-sorted layout."""
    gen = torch.Generator().manual_seed(T + E)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).int().to(DEV)
    align = fused_moe._align_small if path == "small" else fused_moe._align_torch
    sorted_ids, block_expert, num_padded = align(ids, block, E, None)
    sorted_ids, block_expert = sorted_ids.cpu(), block_expert.cpu()
    flat, n = ids.reshape(-1).cpu(), T * k
    used = int(num_padded)
    counts = torch.bincount(flat.long(), minlength=E)
    assert used == int(((counts + block - 1) // block * block).sum())
    real = sorted_ids[sorted_ids < n]
    assert sorted(real.tolist()) == list(range(n))  # every pair exactly once
    assert (sorted_ids[used:] == n).all()  # past the end: padding only
    for b in range(used // block):
        rows = sorted_ids[b * block:(b + 1) * block]
        rows = rows[rows < n].long()
        assert (flat[rows] == block_expert[b]).all()  # a block holds one expert's pairs
        assert rows.tolist() == sorted(rows.tolist())  # stable: pair order kept
    assert (block_expert[used // block:] == -1).all()


@pytest.mark.parametrize("T,E,k,block", ALIGN[:4])
def test_align_paths_agree_with_expert_map(T, E, k, block):
    gen = torch.Generator().manual_seed(T * E)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).int().to(DEV)
    local = E - E // 2
    emap = torch.full((E,), -1, dtype=torch.int32)
    emap[E // 2:] = torch.arange(local, dtype=torch.int32)
    emap = emap.to(DEV)
    small = fused_moe._align_small(ids, block, local, emap)
    big = fused_moe._align_torch(ids, block, local, emap)
    for a, b in zip(small, big):
        assert torch.equal(a.long().cpu(), b.long().cpu())


TOPK = [(1, 8, 2, {}), (33, 128, 8, {}), (5, 60, 4, dict(renormalize=False)),
        (9, 64, 6, dict(scoring="sigmoid", use_correction_bias=True, routed_scaling_factor=2.5)),
        (4, 256, 8, dict(scoring="sigmoid", renormalize=False)), (3, 7, 1, {})]


@pytest.mark.parametrize("T,E,k,kw", TOPK, ids=[f"T{c[0]}-E{c[1]}-k{c[2]}" for c in TOPK])
def test_fused_topk_matches_select_experts(T, E, k, kw):
    from asgl.kernels.triton.moe_topk import fused_topk

    gen = torch.Generator().manual_seed(E + k)
    logits = torch.randn(T, E, generator=gen).to(DEV)
    bias = (torch.randn(E, generator=gen) * 0.2).to(DEV) if kw.get("use_correction_bias") else None
    router = RouterConfig(top_k=k, **kw)
    ref_w, ref_ids = select_experts(logits, router, bias)
    w, ids = fused_topk(logits, k, sigmoid=router.scoring == "sigmoid",
                        renormalize=router.renormalize, scale=router.routed_scaling_factor,
                        correction_bias=bias)
    order, ref_order = ids.long().sort(-1), ref_ids.long().sort(-1)
    assert torch.equal(order.values, ref_order.values)
    torch.testing.assert_close(w.gather(1, order.indices), ref_w.gather(1, ref_order.indices))


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
def test_fused_topk_nan_row_stays_in_range():
    """A NaN row (a diverged or padding row) must not yield an expert id past the end,
    which the sort/align would index with."""
    from asgl.kernels.triton.moe_topk import fused_topk

    logits = torch.randn(3, 16).to(DEV)
    logits[1] = float("nan")
    _, ids = fused_topk(logits, 4)
    assert int(ids.min()) >= 0 and int(ids.max()) < 16


def test_down_gemm_takes_its_own_tiles():
    """A table entry's "down" tiles (another BLOCK_N / BLOCK_K / GROUP_M) give the same
    result; BLOCK_M stays the rows' one even if "down" names another."""
    x, w13, w2, weights, ids = _inputs(21, 8, 2, 64, 48, torch.float32, seed=8)
    base = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2)
    down = dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=2)
    out = fused_experts(x, w13, w2, weights, ids, config={**base, "down": down})
    ref = fused_experts_ref(x, w13, w2, weights, ids)
    assert rel_err(out, ref) < 1e-4


def test_tuned_table_lookup(tmp_path, monkeypatch):
    """A tuned table's nearest entry within a factor 2 of the token count; the defaults
    outside what it covers (a partial tuning run)."""
    import json

    from asgl.kernels.triton import moe_config

    monkeypatch.setattr(moe_config, "CONFIG_DIR", str(tmp_path))
    monkeypatch.setattr(moe_config, "_device_name", lambda: "Test GPU")
    moe_config._tuned_table.cache_clear()
    name = moe_config.config_file_name(8, 64, 32, torch.bfloat16, "Test GPU")
    small, mid = dict(BLOCK_M=16, tag=1), dict(BLOCK_M=32, tag=2)
    (tmp_path / name).write_text(json.dumps({"1": small, "64": mid}))
    try:
        got = {M: moe_config.get_config(M, 8, 64, 32, 2, torch.bfloat16) for M in
               (1, 2, 3, 40, 128, 129, 8192)}
    finally:
        moe_config._tuned_table.cache_clear()
    assert got[1] == got[2] == small and got[40] == got[128] == mid
    for M in (3, 129, 8192):
        assert "tag" not in got[M]
