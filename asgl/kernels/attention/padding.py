"""How a CUDA-graph batch is padded, as the attention plan sees it (the graph runner pads
the token tensors the same way; see asgl/engine/worker/cuda_graph_runner.py)."""

from __future__ import annotations


def pad_extend_lengths(extend_lens: list[int], seq_lens: list[int], padded_bs: int,
                       padded_tokens: int) -> tuple[list[int], list[int]]:
    """Per-request (query lengths, KV lengths) of a batch padded to `padded_bs` requests and
    `padded_tokens` tokens, for the attention plan.

    Decode padding (one token per padding request) keeps one query on one key each; any
    other padding gives every padding request no query and one key, except the last, which
    takes all the padding tokens as queries over as many keys (all slot 0, causal). A
    graph replays only batches with a request slot to spare for that."""
    pad = padded_bs - len(extend_lens)
    extra = padded_tokens - sum(extend_lens)
    if pad < 0 or extra < 0 or (extra and not pad):
        raise ValueError(f"cannot pad {len(extend_lens)} requests / {sum(extend_lens)} tokens "
                         f"to {padded_bs} / {padded_tokens}")
    if extra == pad:
        return extend_lens + [1] * pad, seq_lens + [1] * pad
    if not pad:
        return list(extend_lens), list(seq_lens)
    qo = extend_lens + [0] * (pad - 1) + [extra]
    kv = seq_lens + [1] * (pad - 1) + [max(extra, 1)]
    return qo, kv
