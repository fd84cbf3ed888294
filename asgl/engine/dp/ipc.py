"""Messages between the data-parallel front and its engine replicas (asgl/engine/dp.py).

One TCP connection on 127.0.0.1 per replica; each message is a 4-byte big-endian length
and a msgspec msgpack body, a tagged union (no pickle). The front sends requests, aborts
and cache flushes; a replica answers with stream chunks (the engine's own `StreamChunk`),
failures, and a load report a few times a second while it changes.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Optional, Union

import msgspec

from asgl.config import EngineConfig
from asgl.engine.contracts.outputs import StreamChunk
from asgl.engine.contracts.sampling_params import SamplingParams

_LEN = struct.Struct(">I")
MAX_FRAME = 256 << 20


# front -> replica
class Submit(msgspec.Struct, tag="submit"):
    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0


class Abort(msgspec.Struct, tag="abort"):
    rid: str


class Flush(msgspec.Struct, tag="flush"):
    pass


# replica -> front
class Hello(msgspec.Struct, tag="hello"):
    index: int
    token: str  # the front's secret: only its own replicas are accepted
    context_len: int
    vocab_size: int
    capacity: int  # KV pool tokens, which sizes the front's view of the replica's cache
    pid: int
    supports_grammar: bool = False


class Chunk(msgspec.Struct, tag="chunk"):
    rid: str
    chunk: StreamChunk


class Failed(msgspec.Struct, tag="failed"):
    rid: str
    message: str
    kind: str = "invalid"  # "invalid" (HTTP 400), "not_running" (503), "error" (500)
    param: Optional[str] = None


class Flushed(msgspec.Struct, tag="flushed"):
    ok: bool


class Load(msgspec.Struct, tag="load"):
    running: int
    waiting: int
    capacity: int
    free: int
    cached: int
    num_steps: int
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    num_retractions: int


ToReplica = Union[Submit, Abort, Flush]
ToFront = Union[Hello, Chunk, Failed, Flushed, Load]


class ReplicaBoot(msgspec.Struct):
    """What a replica process reads from stdin (JSON) at start."""
    config: EngineConfig
    index: int
    port: int
    token: str
    threads: int = 0  # torch CPU threads (0: leave torch's default)


class FrameWriter:
    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self._encoder = msgspec.msgpack.Encoder()

    def send(self, msg: msgspec.Struct) -> None:
        """Queue one message (writes are buffered; frames never interleave)."""
        body = self._encoder.encode(msg)
        self.writer.write(_LEN.pack(len(body)) + body)

    async def drain_if_backed_up(self, limit: int = 1 << 20) -> None:
        if self.writer.transport.get_write_buffer_size() > limit:
            await self.writer.drain()


class FrameReader:
    def __init__(self, reader: asyncio.StreamReader, kind: type):
        self.reader = reader
        self._decoder = msgspec.msgpack.Decoder(kind)

    async def recv(self):
        """The next message, or None at end of stream (a reset too: closing a socket with
        unread data in it resets the connection, which is how shutdowns often end)."""
        try:
            head = await self.reader.readexactly(_LEN.size)
            (size,) = _LEN.unpack(head)
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes")
            return self._decoder.decode(await self.reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
