"""CPU-testable pieces of the GPU path: graph batch sizes, FlashInfer page indices, the
request-table write log and the scheduler's id slicing (exact values)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from asgl.engine.worker.cuda_graph_runner import capture_sizes
from asgl.engine.scheduler.slots import ReqToTokenPool
from asgl.kernels.attention.flashinfer_backend import _kv_indices


def test_capture_sizes_cover_every_batch_up_to_max():
    assert capture_sizes(1) == [1]
    assert capture_sizes(16) == [1, 2, 4, 8, 16]
    sizes = capture_sizes(300)
    assert sizes[-1] == 300 and sizes == sorted(set(sizes))
    assert capture_sizes(512)[-4:] == [416, 448, 480, 512]


def test_kv_indices_follow_each_request_row():
    table = torch.arange(50).view(5, 10)
    batch = SimpleNamespace(seq_lens=torch.tensor([3, 1, 4]),
                            req_pool_indices=torch.tensor([4, 0, 2]), req_to_token=table)
    out = _kv_indices(batch, 8)
    assert out.dtype == torch.int32
    assert out.tolist() == [40, 41, 42, 0, 20, 21, 22, 23]


def test_take_writes_replays_every_write_in_order():
    pool = ReqToTokenPool(4, 16, track_writes=True)
    pool.write(3, 5, torch.tensor([7, 8, 9]))
    pool.write(1, 0, torch.tensor([4]))
    pool.write(2, 10, torch.tensor([11, 12]))
    rows, cols, vals = pool.take_writes()
    assert rows.tolist() == [3, 3, 3, 1, 2, 2]
    assert cols.tolist() == [5, 6, 7, 0, 10, 11]
    assert vals.tolist() == [7, 8, 9, 4, 11, 12]
    assert pool.req_to_token[3, 5:8].tolist() == [7, 8, 9]
    assert pool.take_writes() is None


def test_known_ids_slices_prompt_and_output():
    from asgl.engine.scheduler.scheduler import _known_ids

    req = SimpleNamespace(prompt_ids=[1, 2, 3], output_ids=[4, 5])
    full = req.prompt_ids + req.output_ids
    for start in range(6):
        for n in range(1, 4):
            assert _known_ids(req, start, n) == full[start:start + n]
