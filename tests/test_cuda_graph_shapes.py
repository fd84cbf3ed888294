"""Which CUDA graph a batch replays, and how it is padded (the host-side logic of
asgl/engine/cuda_graph_runner.py; the replay itself is checked on the GPU by
bench/gpu_checks.py graphs)."""

from types import SimpleNamespace

import pytest
import torch

from asgl.engine.contracts.forward_batch import ForwardBatch, ForwardMode
from asgl.engine.worker.cuda_graph_runner import (EXTEND_GRAPH_BS, CudaGraphRunner, capture_sizes,
                                                  extend_token_sizes)
from asgl.kernels.attention.padding import pad_extend_lengths


def test_extend_token_sizes():
    sizes = extend_token_sizes(1024)
    assert sizes[0] == EXTEND_GRAPH_BS and sizes[-1] == 1024
    assert sizes == sorted(set(sizes))
    assert all(b / a <= 2.0 for a, b in zip(sizes, sizes[1:]))
    assert extend_token_sizes(0) == []
    assert extend_token_sizes(1000)[-1] == 1000 and max(extend_token_sizes(1000)) == 1000
    assert extend_token_sizes(10) == [EXTEND_GRAPH_BS]  # never fewer tokens than requests


@pytest.mark.parametrize("extend,seq,bs,tokens", [
    ([1, 1, 1], [5, 9, 2], 4, 4),  # decode padding: one query on one key each
    ([1, 1, 1], [5, 9, 2], 8, 8),
    ([1, 1, 200], [5, 9, 300], 64, 256),  # mixed: the last padding request takes 54
    ([3, 7], [3, 7], 64, 64),  # fresh prefill
    ([4, 4], [10, 20], 3, 8),  # nothing to pad but a request with no tokens
])
def test_pad_extend_lengths(extend, seq, bs, tokens):
    qo, kv = pad_extend_lengths(extend, seq, bs, tokens)
    assert len(qo) == len(kv) == bs
    assert sum(qo) == tokens
    assert qo[:len(extend)] == extend and kv[:len(seq)] == seq  # real rows untouched
    # every query has its causal keys (aligned to the end), every request at least one key
    assert all(k >= max(q, 1) for q, k in zip(qo, kv))
    pad_q = qo[len(extend):]
    if tokens - sum(extend) == bs - len(extend):
        assert pad_q == [1] * len(pad_q)
    elif pad_q:
        assert pad_q[:-1] == [0] * (len(pad_q) - 1)


@pytest.mark.parametrize("extend,bs,tokens", [
    ([1, 1], 1, 2),  # fewer requests than the batch
    ([5, 5], 2, 8),  # fewer tokens than the batch
    ([5, 5], 2, 12),  # padding tokens but no padding request to hold them
])
def test_pad_extend_lengths_refuses(extend, bs, tokens):
    with pytest.raises(ValueError):
        pad_extend_lengths(extend, list(extend), bs, tokens)


def _runner(max_bs=64, max_tokens=1024, pool_tokens=100_000):
    fake = SimpleNamespace(device=torch.device("cpu"),
                           req_to_token=torch.zeros((8, 4096), dtype=torch.int64),
                           kv_pool=SimpleNamespace(num_tokens=pool_tokens))
    return CudaGraphRunner(fake, max_bs, max_tokens)


def _batch(prefix, extend, mode=None, prompt_lp=False):
    n = sum(extend)
    if mode is None:
        mode = ForwardMode.DECODE if set(extend) == {1} else (
            ForwardMode.MIXED if 1 in extend else ForwardMode.EXTEND)
    fb = ForwardBatch.build(mode=mode, input_ids=[1] * n, positions=list(range(n)),
                            out_cache_loc=torch.arange(n), req_pool_indices=list(range(len(extend))),
                            prefix_lens=prefix, extend_lens=extend,
                            logits_rows=list(range(len(extend))),
                            sample_rows=list(range(len(extend))), device=torch.device("cpu"))
    if prompt_lp:
        fb.prompt_lp_rows = torch.arange(n)
    return fb


def test_graph_key_decode_and_extend():
    gr = _runner()
    assert gr.sizes == capture_sizes(64)
    assert gr.graph_key(_batch([10] * 13, [1] * 13)) == (16, 16)
    assert gr.graph_key(_batch([10] * 64, [1] * 64)) == (64, 64)
    # 8 decodes + a 256-token chunk: 264 tokens -> the 320-token extend graph
    assert gr.graph_key(_batch([100] * 9, [1] * 8 + [256])) == (EXTEND_GRAPH_BS, 320)
    # jump-forward-like extends and small prefills share the smallest extend graph
    assert gr.graph_key(_batch([50] * 5, [2, 3, 1, 4, 9])) == (EXTEND_GRAPH_BS, 64)
    assert gr.graph_key(_batch([0, 0], [30, 34])) == (EXTEND_GRAPH_BS, 64)
    assert gr.graph_key(_batch([0], [1024])) == (EXTEND_GRAPH_BS, 1024)


def test_graph_key_falls_back_to_eager():
    gr = _runner()
    assert gr.graph_key(_batch([0], [1025])) is None  # more tokens than any graph
    assert gr.graph_key(_batch([5] * 64, [2] * 64)) is None  # no request slot for padding
    assert gr.graph_key(_batch([10] * 65, [1] * 65)) is None  # decode above --cuda-graph-max-bs
    assert gr.graph_key(_batch([0], [100], prompt_lp=True)) is None  # prompt logprobs
    assert gr.graph_key(_batch([0], [8], mode=ForwardMode.ENCODE)) is None
    small = _runner(pool_tokens=50)  # the page-index buffer bounds the keys of a batch
    assert small.graph_key(_batch([500], [100])) is None
    assert _runner(max_tokens=0).graph_key(_batch([0], [100])) is None  # decode graphs only
