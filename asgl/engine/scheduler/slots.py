"""Host-side KV bookkeeping: page size 1, as in SGLang. Owner: the scheduler.

Two pieces (the device buffers themselves are `asgl/engine/worker/kv_cache.py`); the
scheduler reaches them only through `asgl/engine/scheduler/memory.py`:

- `ReqToTokenPool`: a table `req_to_token[row, pos] -> slot`; one row per running request.
  `alloc()` returns a row or None when all rows are taken; `free(row)` gives it back.
- `TokenSlotAllocator`: a free list of KV slot indices. `alloc(n)` returns a LongTensor of
  `n` slots or None when fewer than `n` are free (the caller evicts from the radix cache or
  retracts a request, then tries again); `free(slots)` returns them. Slot 0 is never handed
  out: it is the padding slot that CUDA-graph batches write their dummy tokens to.

Both live on the CPU: allocation decisions are made by the scheduler on the CPU, and
slot ids travel to the device with the step's plan.
"""

from __future__ import annotations

import numpy as np
import torch



class ReqToTokenPool:
    """The table lives on the CPU, where the scheduler and the radix cache read it.

    With `track_writes`, every write is also queued so that the model runner can replay it
    on its device copy (`take_writes`) at the start of the next step, in the worker thread.
    """

    def __init__(self, max_reqs: int, max_context_len: int, device: torch.device | str = "cpu",
                 track_writes: bool = False):
        self.size = max_reqs
        self.max_context_len = max_context_len
        self.req_to_token = torch.zeros((max_reqs, max_context_len), dtype=torch.int64,
                                        device=device)
        # numpy view of a CPU table: slice writes through it cost ~1 us instead of ~15 us
        # for a torch slice assignment; a step's new tokens go in with one scatter
        # (write_tokens)
        self._table_np = self.req_to_token.numpy() if self.req_to_token.device.type == "cpu" \
            else None
        self._free_rows: list[int] = list(range(max_reqs - 1, -1, -1))
        self.track_writes = track_writes
        # queued (rows, cols, slots) int64 arrays, concatenated by take_writes
        self._writes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def alloc(self) -> int | None:
        """A free row, or None when every row is in use."""
        return self._free_rows.pop() if self._free_rows else None

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def available(self) -> int:
        return len(self._free_rows)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        """Record that positions [start, start + len(slots)) of `row` live in `slots`."""
        if self._table_np is not None and slots.device.type == "cpu":
            self._table_np[row, start:start + slots.numel()] = slots.numpy()
        else:
            self.req_to_token[row, start:start + slots.numel()] = slots
        if self.track_writes:
            n = slots.numel()
            self._writes.append((np.full(n, row, dtype=np.int64),
                                 np.arange(start, start + n, dtype=np.int64),
                                 slots.to("cpu", torch.int64).numpy()))

    def write_tokens(self, rows: np.ndarray, cols: np.ndarray, slots: torch.Tensor) -> None:
        """Scatter: position cols[i] of row rows[i] lives in slots[i] (one call per step
        for a whole batch, instead of one slice write per request)."""
        vals = slots.numpy()
        if self._table_np is not None:
            self._table_np[rows, cols] = vals
        else:
            self.req_to_token[torch.from_numpy(rows), torch.from_numpy(cols)] = slots
        if self.track_writes:
            self._writes.append((rows, cols, vals))

    def take_writes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(rows, cols, slots) of the writes since the last call, for the device copy."""
        if not self._writes:
            return None
        if len(self._writes) == 1:
            parts = self._writes[0]
        else:
            parts = tuple(np.concatenate(a) for a in zip(*self._writes))
        self._writes = []
        # the arrays are never written again (each write queues fresh ones): no copies
        return tuple(torch.from_numpy(np.asarray(a, dtype=np.int64)) for a in parts)


class TokenSlotAllocator:
    """Free list of KV slots 1..capacity (slot 0 is the padding slot)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._free = torch.arange(1, capacity + 1, dtype=torch.int64)
        self._num_free = capacity
        # Freed slots are appended to a list of tensors and merged lazily, so that freeing
        # many small runs is O(1) each.
        self._released: list[torch.Tensor] = []
        self._num_released = 0

    def available(self) -> int:
        return self._num_free + self._num_released

    def alloc(self, n: int) -> torch.Tensor | None:
        """`n` free slots (CPU LongTensor), or None if fewer than `n` are free."""
        if n > self._num_free:
            self._merge()
            if n > self._num_free:
                return None
        out = self._free[self._num_free - n:self._num_free]
        self._num_free -= n
        return out.clone()

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        self._released.append(slots.detach().to("cpu", torch.int64).reshape(-1))
        self._num_released += slots.numel()

    def _merge(self) -> None:
        if not self._released:
            return
        live = self._free[:self._num_free]
        self._free = torch.cat([live] + self._released)
        self._num_free = self._free.numel()
        self._released.clear()
        self._num_released = 0

    def free_slots(self) -> torch.Tensor:
        """Every free slot (for integrity checks)."""
        self._merge()
        return self._free[:self._num_free].clone()

    def free_slot_set(self) -> set[int]:
        """Every free slot as a set (tests' exact assertions)."""
        return set(self.free_slots().tolist())
