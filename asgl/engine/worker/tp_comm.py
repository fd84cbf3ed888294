"""What rank 0 sends the other tensor-parallel ranks, and how: no pickle, only tensors.

Every command travels on the gloo control group (`get_cpu_group`), in host memory, so it
works the same whether the model's own collectives run on gloo (CPU) or NCCL (GPU), and
across nodes. One command is one broadcast of a fixed-size int64 buffer of `CTRL_WORDS`:

    word 0          byte length L of the header (msgspec msgpack of `Header`)
    words 1..       the header bytes, zero-padded to whole words
    then            the int64 payload, when it fits; otherwise a second broadcast of
                    exactly `header.payload` words follows

A step's payload is the ForwardBatch's int64 tensors concatenated in `STEP_FIELDS` order
(`header.sizes[i]` words each, -1 for a None field), then the request-table writes
(rows, cols, slots; `header.writes` words each). A decode step of 64 requests fits in the
first broadcast, so most steps cost one small host broadcast.

After each step that samples, rank 0 broadcasts the sampled ids on the device group
(`share_next_ids`): ranks >= 1 need them to resolve the next step's placeholder ids
(overlap scheduling), and only rank 0 samples.
"""

from __future__ import annotations

import enum
from typing import Optional

import msgspec
import torch
import torch.distributed as dist

from asgl.distributed import get_cpu_group, get_tp_group
from asgl.engine.contracts.forward_batch import INDEX_FIELDS, ForwardBatch, ForwardMode

CTRL_WORDS = 2048  # 16 KiB
STEP_FIELDS = INDEX_FIELDS
TableWrites = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Op(enum.IntEnum):
    STEP = 1
    INIT_MEMORY = 2  # args: num_tokens, max_reqs, context_len
    SHUTDOWN = 3


class Header(msgspec.Struct, array_like=True):
    op: int
    payload: int = 0  # int64 words after the header
    mode: int = 0
    sizes: list[int] = []
    writes: int = 0
    placeholders: bool = False
    args: list[int] = []


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Header)


class ControlChannel:
    """Rank 0 sends, every other rank receives; one buffer reused for every command."""

    def __init__(self) -> None:
        self.group = get_cpu_group()
        if self.group is None:
            raise RuntimeError("the control channel needs init_distributed first")
        self.buf = torch.zeros(CTRL_WORDS, dtype=torch.int64)

    def send(self, header: Header, payload: Optional[torch.Tensor] = None) -> None:
        inline = pack(header, payload, self.buf)
        dist.broadcast(self.buf, 0, group=self.group)
        if not inline:
            dist.broadcast(payload.contiguous(), 0, group=self.group)

    def recv(self) -> tuple[Header, torch.Tensor]:
        dist.broadcast(self.buf, 0, group=self.group)
        header, payload = unpack(self.buf)
        if payload is None:
            payload = torch.empty(header.payload, dtype=torch.int64)
            dist.broadcast(payload, 0, group=self.group)
        return header, payload


def pack(header: Header, payload: Optional[torch.Tensor], buf: torch.Tensor) -> bool:
    """Write `header` (and `payload` when it fits) into `buf`; True when it fit."""
    n = 0 if payload is None else payload.numel()
    header.payload = n
    raw = _encoder.encode(header)
    start = 1 + _words(len(raw))
    if start > buf.numel():
        raise ValueError(f"control header of {len(raw)} bytes does not fit")
    buf[0] = len(raw)
    buf[1:start] = 0
    buf[1:].view(torch.uint8)[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    inline = start + n <= buf.numel()
    if inline and n:
        buf[start:start + n] = payload
    return inline


def unpack(buf: torch.Tensor) -> tuple[Header, Optional[torch.Tensor]]:
    """The header in `buf` and a copy of its payload, or None when the payload did not fit
    (it follows in a broadcast of its own)."""
    length = int(buf[0])
    header = _decoder.decode(buf[1:].view(torch.uint8)[:length].numpy().tobytes())
    start, n = 1 + _words(length), header.payload
    if start + n > buf.numel():
        return header, None
    return header, buf[start:start + n].clone()  # the buffer is reused by the next command


def _words(nbytes: int) -> int:
    return -(-nbytes // 8)


# ---------------------------------------------------------------------- steps
def encode_step(batch: ForwardBatch, writes: Optional[TableWrites]) -> tuple[Header, torch.Tensor]:
    """The header and payload of one step, from the scheduler's host tensors."""
    parts, sizes = [], []
    for name in STEP_FIELDS:
        value = getattr(batch, name)
        if value is None:
            sizes.append(-1)
            continue
        parts.append(value.reshape(-1).to(torch.int64))
        sizes.append(parts[-1].numel())
    num_writes = 0
    if writes is not None:
        num_writes = writes[0].numel()
        parts.extend(t.reshape(-1).to(torch.int64) for t in writes)
    header = Header(op=Op.STEP, mode=int(batch.mode), sizes=sizes, writes=num_writes,
                    placeholders=bool(batch.extra.get("placeholders")))
    payload = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
    return header, payload


def decode_step(header: Header,
                payload: torch.Tensor) -> tuple[ForwardBatch, Optional[TableWrites]]:
    """Rebuild the ForwardBatch (host tensors) and table writes that rank 0 sent."""
    fields: dict[str, Optional[torch.Tensor]] = {}
    offset = 0
    for name, size in zip(STEP_FIELDS, header.sizes):
        if size < 0:
            fields[name] = None
            continue
        fields[name] = payload[offset:offset + size]
        offset += size
    writes = None
    if header.writes:
        n = header.writes
        writes = (payload[offset:offset + n], payload[offset + n:offset + 2 * n],
                  payload[offset + 2 * n:offset + 3 * n])
    seq_lens = fields["seq_lens"]
    batch = ForwardBatch(mode=ForwardMode(header.mode), batch_size=int(seq_lens.numel()),
                         seq_lens_cpu=seq_lens.tolist(),
                         prefix_lens_cpu=fields["prefix_lens"].tolist(),
                         extend_lens_cpu=fields["extend_lens"].tolist(), **fields)
    batch.extra["placeholders"] = header.placeholders
    return batch, writes


def share_next_ids(ids: Optional[torch.Tensor], count: int, device: torch.device) -> torch.Tensor:
    """Broadcast rank 0's `count` sampled ids on the device group; every rank returns them.
    On GPUs this is one NCCL op queued behind the sampler: no host sync."""
    if ids is None:
        ids = torch.empty(count, dtype=torch.int64, device=device)
    dist.broadcast(ids, 0, group=get_tp_group())
    return ids
