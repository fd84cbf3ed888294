"""Attention variants of the remote-code families on every backend.

- ALiBi (BaiChuan 13B): the Triton extend and decode kernels against their float32
  references, and the Triton backend against the torch backend (the one the BaiChuan 2
  13B family test ties to the published ALiBi mask) on one batch of prefix hits, chunks and
  decodes through a real KV pool.
- FlashInfer lacks ALiBi; a model that needs it goes to Triton (logged by the model
  runner). That fallback is taken for no family but the ALiBi one: every layer of every
  other family (test_model_families' and test_remote_families') is a FlashInfer variant.
  GLM's half-head rotary is no attention variant at all (the rotary layer applies it).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed")

from asgl.engine.contracts.attention import AttentionSpec  # noqa: E402
from asgl.kernels.attention.variants import flashinfer_gap  # noqa: E402
from asgl.kernels.triton.decode_attention import (decode_attention,  # noqa: E402
                                                  decode_attention_ref)
from asgl.kernels.triton.extend_attention import (build_schedule, extend_attention,  # noqa: E402
                                                  extend_attention_ref, tokens_per_block)
from asgl.models.baichuan import alibi_slopes  # noqa: E402
from helpers import Pools, rel_err  # noqa: E402

DEV = torch.device("cuda" if ON_GPU else "cpu")
H, HKV, D = 6, 6, 32  # 6 heads: slopes of a head count that is no power of two
SLOPES = torch.tensor(alibi_slopes(H), dtype=torch.float32, device=DEV)


def _ivec(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=DEV)


def _pool(seq_lens: list[int], gen: torch.Generator):
    total = sum(seq_lens)
    slots = torch.randperm(total + 7, generator=gen)[:total] + 1
    k_buf = torch.randn(total + 8, HKV, D, generator=gen).to(DEV)
    v_buf = torch.randn(total + 8, HKV, D, generator=gen).to(DEV)
    r2t = torch.zeros(len(seq_lens), max(seq_lens) + 3, dtype=torch.int64)
    off = 0
    for row, n in enumerate(seq_lens):
        r2t[row, :n] = slots[off:off + n]
        off += n
    return k_buf, v_buf, r2t.to(DEV), list(range(len(seq_lens)))


@pytest.mark.parametrize("window", [None, 5])
def test_triton_extend_alibi(window):
    reqs = [(0, 7), (5, 4), (9, 1), (12, 3), (20, 30)]
    gen = torch.Generator().manual_seed(1)
    prefix, ext = [p for p, _ in reqs], [e for _, e in reqs]
    k_buf, v_buf, r2t, rows = _pool([p + e for p, e in reqs], gen)
    q = torch.randn(sum(ext), H, D, generator=gen).to(DEV)
    out = torch.full_like(q, float("nan"))
    starts = [sum(ext[:i]) for i in range(len(ext))]
    sched = build_schedule(ext, tokens_per_block(D, D, H // HKV, q.dtype), DEV)
    kw = dict(sm_scale=D ** -0.5, sliding_window=window, alibi_slopes=SLOPES)
    extend_attention(q, k_buf, v_buf, out, r2t, _ivec(rows), _ivec(prefix), _ivec(ext),
                     _ivec(starts), sched, **kw)
    ref = extend_attention_ref(q, k_buf, v_buf, r2t, rows, prefix, ext, **kw)
    plain = extend_attention_ref(q, k_buf, v_buf, r2t, rows, prefix, ext, sm_scale=D ** -0.5,
                                 sliding_window=window)
    assert rel_err(ref, plain) > 1e-2  # the biases change the result
    assert not torch.isnan(out).any() and rel_err(out, ref) < 1e-4, rel_err(out, ref)


@pytest.mark.parametrize("splits", [1, 3])
def test_triton_decode_alibi(splits):
    seqs = [1, 17, 45, 64]
    gen = torch.Generator().manual_seed(2)
    k_buf, v_buf, r2t, rows = _pool(seqs, gen)
    q = torch.randn(len(seqs), H, D, generator=gen).to(DEV)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k_buf, v_buf, out, r2t, _ivec(rows), _ivec(seqs), sm_scale=D ** -0.5,
                     num_splits=splits, alibi_slopes=SLOPES)
    ref = decode_attention_ref(q, k_buf, v_buf, r2t, rows, seqs, sm_scale=D ** -0.5,
                               alibi_slopes=SLOPES)
    assert not torch.isnan(out).any() and rel_err(out, ref) < 1e-4, rel_err(out, ref)


def test_triton_backend_alibi_matches_torch_backend():
    """Two requests through the same steps (a chunked prompt, a prefix then decodes) on
    the torch and the Triton backend: the same outputs every step."""
    spec = AttentionSpec(layer_id=0, num_heads=H, num_kv_heads=HKV, head_dim=D,
                         scaling=D ** -0.5, alibi_slopes=tuple(alibi_slopes(H)))
    steps = [[9, 4], [6, 1], [1, 1], [1, 1]]
    gen = torch.Generator().manual_seed(3)
    qkv = [[torch.randn(n, 3, H * D, generator=gen) for n in step] for step in steps]
    outs = {}
    for backend in ("torch", "triton"):
        pools = Pools(1, HKV, D, backend=backend, shuffle=torch.Generator().manual_seed(0))
        seqs = [pools.new_seq(), pools.new_seq()]
        got = []
        for step, tensors in zip(steps, qkv):
            batch = pools.build(seqs, [[0] * n for n in step])
            q, k, v = (torch.cat([t[:, i] for t in tensors]).to(DEV) for i in range(3))
            batch.attn_backend.prepare(batch)
            got.append(batch.attn_backend.forward(q, k, v, spec, batch).cpu())
        outs[backend] = torch.cat(got)
    assert rel_err(outs["triton"], outs["torch"]) < 1e-4


def _family_specs() -> dict[str, list[AttentionSpec]]:
    """Every attention layer's spec of every family the family tests run (meta device)."""
    import tempfile
    from pathlib import Path

    import test_model_families as dense
    import test_remote_families as remote
    from asgl.config import EngineConfig
    from asgl.layers.attention import Attention
    from asgl.models.loader import resolve_model
    from asgl.models.registry import get_model_class

    def specs(cls, config) -> list[AttentionSpec]:
        with torch.device("meta"):
            model = cls(config)
        return [m.spec for m in model.modules() if isinstance(m, Attention)]

    out = {}
    for name in dense.FAMILIES:
        config = dense._config(name)
        out[name] = specs(get_model_class(config.architectures or [
            type(config).__name__.replace("TextConfig", "Config").replace(
                "Config", "ForCausalLM")]), config)
    for name, make in remote.CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            case = make()
            if case.config is None:  # the model's own checkpoint
                case.model.save_pretrained(tmp)
            else:
                (Path(tmp) / "config.json").write_text(json.dumps(case.config))
            source = resolve_model(EngineConfig(model_path=tmp, load_format="dummy"))
            config = source.hf_config
            out[name] = specs(get_model_class(config.architectures), config)
    return out


def test_flashinfer_fallback_only_for_alibi():
    found = _family_specs()
    assert len(found) >= 25
    for family, specs in found.items():
        assert specs, family
        gaps = {flashinfer_gap(s) for s in specs}
        if family == "baichuan2_13b_alibi":
            assert None not in gaps, family  # the one family that needs Triton
        else:
            assert gaps == {None}, (family, gaps)
