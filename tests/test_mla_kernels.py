"""MLA attention (asgl/layers/mla.py) and its kernels against float32 torch references on
fresh random inputs: the Triton decode kernel over the latent pool (TRITON_INTERPRET=1 on
the CPU, small shapes; compiled on a GPU), and the whole latent attention of mixed batches
(fresh prefill, prefix hits, chunks, decodes) through the torch and Triton backends, in
both the absorbed and the expanded form, against attention written out from the MLA
equations (K = [W_k c, k_pe], V = W_v c, DeepSeek-V2 §2.1). Tolerances as
tests/test_triton_kernels.py: relative error < 1e-4 float32, < 1e-2 bf16.
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
from asgl.engine.worker.latent_kv_cache import LatentKVPool  # noqa: E402
from asgl.kernels.attention import create_attention_backend  # noqa: E402
from asgl.kernels.triton.mla_decode import mla_decode_attention, mla_decode_ref  # noqa: E402
from asgl.layers.mla import LatentAttention  # noqa: E402
from helpers import rel_err  # noqa: E402

DEV = torch.device("cuda" if ON_GPU else "cpu")
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
SEQS = [1, 17, 45, 64] + ([1000, 4097, 300] if ON_GPU else [])


def _table(seqs: list[int], capacity: int, gen: torch.Generator):
    """req_to_token rows over shuffled slots (1..capacity; 0 is the padding slot)."""
    perm = torch.randperm(capacity, generator=gen) + 1
    table = torch.zeros(len(seqs), max(seqs) + 1, dtype=torch.int64)
    off = 0
    for i, s in enumerate(seqs):
        table[i, :s] = perm[off:off + s]
        off += s
    return table


# (heads, kv_lora_rank, rope dims): one head block, a partial second block, padded dims
DECODE_SHAPES = [(4, 32, 16), (20, 64, 8), (16, 48, 24)]
if ON_GPU:
    DECODE_SHAPES += [(16, 512, 64), (128, 512, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=str)
@pytest.mark.parametrize("splits", [1, 3])
def test_mla_decode_kernel_matches_reference(shape, dtype, splits):
    H, Dl, Dr = shape
    gen = torch.Generator().manual_seed(hash((H, Dl, Dr, splits)) % 1000)
    cap = sum(SEQS) + 8
    table = _table(SEQS, cap, gen).to(DEV)
    kv = torch.randn(cap + 1, 1, Dl + Dr, generator=gen).to(DEV, dtype)
    q = torch.randn(len(SEQS), H, Dl + Dr, generator=gen).to(DEV, dtype)
    out = torch.full((len(SEQS), H, Dl), float("nan"), dtype=dtype, device=DEV)
    rows = torch.arange(len(SEQS), device=DEV)
    seq_t = torch.tensor(SEQS, device=DEV)
    scale = (Dl + Dr) ** -0.5
    mla_decode_attention(q, kv, out, table, rows, seq_t, kv_lora_rank=Dl, sm_scale=scale,
                         num_splits=splits)
    ref = mla_decode_ref(q, kv, table, list(range(len(SEQS))), SEQS, kv_lora_rank=Dl,
                         sm_scale=scale)
    assert rel_err(out.float(), ref) < TOL[dtype]


def test_mla_decode_kernel_fp8_latent():
    H, Dl, Dr, k_scale = 4, 32, 16, 0.5
    gen = torch.Generator().manual_seed(3)
    cap = sum(SEQS) + 8
    table = _table(SEQS, cap, gen).to(DEV)
    kv = (torch.randn(cap + 1, 1, Dl + Dr, generator=gen) / k_scale).to(DEV, torch.float8_e4m3fn)
    q = torch.randn(len(SEQS), H, Dl + Dr, generator=gen).to(DEV, torch.bfloat16)
    out = torch.empty(len(SEQS), H, Dl, dtype=torch.bfloat16, device=DEV)
    rows, seq_t = torch.arange(len(SEQS), device=DEV), torch.tensor(SEQS, device=DEV)
    mla_decode_attention(q, kv, out, table, rows, seq_t, kv_lora_rank=Dl, sm_scale=0.1,
                         num_splits=2, k_scale=k_scale)
    ref = mla_decode_ref(q, kv, table, list(range(len(SEQS))), SEQS, kv_lora_rank=Dl,
                         sm_scale=0.1, k_scale=k_scale)
    assert rel_err(out.float(), ref) < 1e-2


# --------------------------------------------------------------- the latent attention
# (heads, qk_nope, rope, v, kv_lora_rank): tiny; DeepSeek's (FlashInfer's MLA kernels)
DIMS = (4, 16, 8, 12, 32)
DEEPSEEK_DIMS = (16, 128, 64, 128, 512)
# (prefix_len, extend_len) per request
MIXED = [(0, 7), (5, 4), (9, 1), (0, 1), (12, 3), (20, 30)]
DECODE = [(0, 1), (16, 1), (44, 1), (63, 1)]


def _mla_reference(q, lat_all, w, batch_plan, scale, dims):
    """Per request, attention written out from the MLA equations in float32."""
    H, DN, DR, DV, DL = dims
    w = w.float().view(H, DN + DV, DL)
    outs = []
    for (pre, ext), qi, lat in zip(batch_plan, q, lat_all):
        lat = lat.float()
        k = torch.cat([torch.einsum("hnl,sl->shn", w[:, :DN], lat[:, :DL]),
                       lat[:, None, DL:].expand(-1, H, DR)], dim=-1)
        v = torch.einsum("hvl,sl->shv", w[:, DN:], lat[:, :DL])
        s = torch.einsum("qhd,shd->hqs", qi.float(), k) * scale
        qpos = torch.arange(pre, pre + ext)[:, None]
        s = s.masked_fill(torch.arange(pre + ext)[None, :] > qpos, float("-inf"))
        outs.append(torch.einsum("hqs,shv->qhv", s.softmax(-1), v).reshape(ext, H * DV))
    return torch.cat(outs)


def _run_layer(plan, backend_name, dtype, expanded, gen, dims=DIMS, expand_min=4):
    H, DN, DR, DV, DL = dims
    seqs = [p + e for p, e in plan]
    cap = sum(seqs) + 4
    table = _table(seqs, cap, gen)
    pool = LatentKVPool(cap, 1, DL, DR, dtype, DEV)
    lat_all, q_all, new_lat, new_slots = [], [], [], []
    for i, (pre, ext) in enumerate(plan):
        lat = torch.randn(pre + ext, DL + DR, generator=gen).to(dtype)
        lat_all.append(lat)
        q_all.append(torch.randn(ext, H, DN + DR, generator=gen).to(dtype))
        if pre:
            pool.set_kv(0, table[i, :pre].to(DEV), lat[:pre].to(DEV))
        new_lat.append(lat[pre:])
        new_slots.append(table[i, pre:pre + ext])
    w = (torch.randn(H * (DN + DV), DL, generator=gen) * DL ** -0.5).to(dtype)
    scale = (DN + DR) ** -0.5
    if backend_name == "flashinfer_mla":  # GPU only: FlashInfer's paged MLA kernels
        pytest.importorskip("flashinfer")
        backend = create_attention_backend(backend_name, device=DEV, num_heads=H,
                                           kv_lora_rank=DL, rope_dim=DR, sm_scale=scale,
                                           dtype=dtype)
    else:
        backend = create_attention_backend(backend_name)
        backend.mla_expanded_prefill = expanded
        backend.mla_expand_min_tokens = expand_min
    decode = all(e == 1 for _, e in plan)
    T = sum(e for _, e in plan)
    batch = ForwardBatch.build(
        mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND,
        input_ids=[0] * T, positions=[0] * T, out_cache_loc=torch.cat(new_slots),
        req_pool_indices=list(range(len(plan))), prefix_lens=[p for p, _ in plan],
        extend_lens=[e for _, e in plan], logits_rows=[0], sample_rows=[0], device=DEV,
        req_to_token=table.to(DEV), kv_pool=pool, attn_backend=backend)
    layer = LatentAttention(H, DN, DR, DV, DL, scale, layer_id=0)
    out = layer(torch.cat(q_all).to(DEV), torch.cat(new_lat).to(DEV), w.to(DEV), batch)
    ref = _mla_reference(q_all, lat_all, w, plan, scale, dims)
    # the pool now holds every request's whole latent sequence
    for i, lat in enumerate(lat_all):
        assert torch.equal(pool.get_latent(0)[table[i, :len(lat)].to(DEV), 0].cpu(), lat)
    return out.float().cpu(), ref


# (backend, expanded prefill, fewest new tokens for the expanded form): with 4, the mixed
# plan's requests of 7, 4 and 30 new tokens are expanded and the others (1, 1, 3 tokens)
# attended row by row in absorbed form; 1: all expanded; 1000: all rows absorbed.
CASES = [("torch", True, 4), ("torch", True, 1), ("torch", True, 1000), ("torch", False, 0),
         ("triton", True, 4), ("triton", True, 1), ("triton", True, 1000),
         ("triton", False, 0), ("flashinfer_mla", False, 0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend,expanded,expand_min", CASES,
                         ids=[f"{b}-{f'split{m}' if e else 'absorbed'}" for b, e, m in CASES])
@pytest.mark.parametrize("plan", [MIXED, DECODE], ids=["mixed", "decode"])
def test_latent_attention_matches_mla_equations(plan, backend, expanded, expand_min, dtype):
    if backend == "flashinfer_mla" and (not ON_GPU or dtype == torch.float32):
        pytest.skip("FlashInfer's MLA kernels: CUDA, fp16/bf16")
    if plan is DECODE and expand_min not in (0, 4):
        pytest.skip("decode batches take the absorbed path whatever the split")
    if (backend == "triton" and not expanded and plan is MIXED and not ON_GPU
            and dtype != torch.float32):
        pytest.skip("absorbed extend under the interpreter: the float32 case covers it")
    gen = torch.Generator().manual_seed(11)
    dims = DEEPSEEK_DIMS if backend == "flashinfer_mla" else DIMS
    out, ref = _run_layer(plan, backend, dtype, expanded, gen, dims, expand_min)
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)


def test_triton_decode_graph_state_replays_any_batch():
    """The Triton backend's decode-graph hooks, as the graph runner uses them (here
    without a graph: the forward of the captured batch stands for the replay): the
    captured batch's state points at static lengths / table rows; before a replay they
    are rewritten from the real batch (3 requests padded to 4), and the padded forward
    gives the eager outputs in the real rows."""
    H_, DN_, DR_, DV_, DL_ = DIMS
    gen = torch.Generator().manual_seed(5)
    seqs = [17, 5, 40]
    cap = sum(seqs) + 4
    table = _table(seqs, cap, gen)
    pool = LatentKVPool(cap, 1, DL_, DR_, torch.float32, DEV)
    pool.buffers[0].copy_(torch.randn(pool.buffers[0].shape, generator=gen))
    layer = LatentAttention(H_, DN_, DR_, DV_, DL_, 0.2, layer_id=0)
    w = torch.randn(H_ * (DN_ + DV_), DL_, generator=gen) * DL_ ** -0.5
    q = torch.randn(4, H_, DN_ + DR_, generator=gen)
    new = torch.randn(4, DL_ + DR_, generator=gen)
    backend = create_attention_backend("triton")
    backend.enable_decode_graphs(num_splits=3)
    assert backend.supports_cuda_graph and not backend.graph_extend
    backend.init_cuda_graph_state([(1, 1), (4, 4)], 0, device=DEV)

    def decode_batch(lens, rows, slots):
        return ForwardBatch.build(
            mode=ForwardMode.DECODE, input_ids=[0] * len(lens), positions=[s - 1 for s in lens],
            out_cache_loc=slots, req_pool_indices=rows, prefix_lens=[s - 1 for s in lens],
            extend_lens=[1] * len(lens), logits_rows=[0], sample_rows=[0], device=DEV,
            req_to_token=table.to(DEV), kv_pool=pool, attn_backend=backend)

    last = torch.tensor([int(table[i, s - 1]) for i, s in enumerate(seqs)])
    # "capture": a static batch of 4 one-token rows on table row 0, slot 0
    static = decode_batch([1] * 4, [0] * 4, torch.zeros(4, dtype=torch.int64))
    backend.prepare_cuda_graph(static, 4, 4)
    # "replay": the real batch rewrites the static lengths and rows; the runner pads the
    # token tensors (slot 0 for the padding row)
    real = decode_batch(seqs, [0, 1, 2], last)
    backend.prepare_cuda_graph(real, 4, 4)
    static.out_cache_loc = torch.cat([last, torch.zeros(1, dtype=torch.int64)]).to(DEV)
    graphed = layer(q.to(DEV), new.to(DEV), w.to(DEV), static)[:3]
    eager_batch = decode_batch(seqs, [0, 1, 2], last)
    eager = layer(q[:3].to(DEV), new[:3].to(DEV), w.to(DEV), eager_batch)
    assert rel_err(graphed.cpu(), eager.cpu()) < 1e-5
