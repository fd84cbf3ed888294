"""The tensor-parallel step format without processes: header packing (inline payload or
a second broadcast) and a ForwardBatch's round trip through encode/decode."""

from __future__ import annotations

import torch

from asgl.engine.contracts.forward_batch import ForwardBatch, ForwardMode
from asgl.engine.worker.tp_comm import (CTRL_WORDS, Header, Op, decode_step, encode_step, pack,
                                 unpack)


def test_header_and_small_payload_share_one_buffer():
    buf = torch.zeros(CTRL_WORDS, dtype=torch.int64)
    header = Header(op=Op.INIT_MEMORY, args=[4096, 64, 2048])
    assert pack(header, torch.arange(7), buf)
    got, payload = unpack(buf)
    assert got.op == Op.INIT_MEMORY and got.args == [4096, 64, 2048]
    assert payload.tolist() == list(range(7))


def test_large_payload_goes_separately():
    buf = torch.zeros(CTRL_WORDS, dtype=torch.int64)
    assert not pack(Header(op=Op.STEP), torch.arange(CTRL_WORDS), buf)
    got, payload = unpack(buf)
    assert payload is None and got.payload == CTRL_WORDS


def test_step_round_trip():
    batch = ForwardBatch.build(
        mode=ForwardMode.MIXED, input_ids=[5, 6, 7, -1], positions=[0, 1, 2, 9],
        out_cache_loc=torch.tensor([11, 12, 13, 14]), req_pool_indices=[3, 1],
        prefix_lens=[0, 9], extend_lens=[3, 1], logits_rows=[2, 3], sample_rows=[0, 1],
        device=torch.device("cpu"))
    batch.extra["placeholders"] = True
    writes = (torch.tensor([3, 3]), torch.tensor([0, 1]), torch.tensor([11, 12]))
    header, payload = encode_step(batch, writes)
    buf = torch.zeros(CTRL_WORDS, dtype=torch.int64)
    pack(header, payload, buf)
    header, payload = unpack(buf)
    got, got_writes = decode_step(header, payload)
    assert got.mode == ForwardMode.MIXED and got.batch_size == 2
    for name in ("input_ids", "positions", "out_cache_loc", "req_pool_indices", "seq_lens",
                 "prefix_lens", "extend_lens", "extend_start_loc", "logits_indices",
                 "sample_rows"):
        assert torch.equal(getattr(got, name), getattr(batch, name)), name
    assert got.seq_lens_cpu == [3, 10] and got.extend_lens_cpu == [3, 1]
    assert got.extra["placeholders"] is True
    assert [t.tolist() for t in got_writes] == [[3, 3], [0, 1], [11, 12]]
