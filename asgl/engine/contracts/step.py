"""One step across the thread boundary: the plan the loop hands the worker, and what the
worker hands back.

`StepPlan` holds host memory only (CPU tensors, numpy, Python values): the loop thread
never creates a device tensor; the worker uploads the plan in one pinned copy. `StepOutput`
comes back as plain Python lists once the step's results reached the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from asgl.engine.contracts.forward_batch import ForwardBatch


@dataclass
class StepPlan:
    forward: ForwardBatch  # host tensors; the worker moves them to its device
    sampling: Any = None  # SamplingBatch on the host (asgl/engine/sampling/batch.py), or None
    # (rows, cols, slots) request-table writes since the last step, for the worker's device
    # copy of the table; None when there are none or the worker reads the host table (CPU)
    table_writes: Optional[tuple] = None
    # The scheduler's host request table: a CPU worker reads it directly (no device copy)
    req_to_token: Any = None


@dataclass
class StepOutput:
    next_ids: list[int]
    logprobs: Optional[list[float]] = None
    top_ids: Optional[list[list[int]]] = None
    top_values: Optional[list[list[float]]] = None
    prompt_logprobs: Optional[list[float]] = None
    prompt_top_ids: Optional[list[list[int]]] = None
    prompt_top_values: Optional[list[list[float]]] = None
    forward_seconds: float = 0.0
    # sampling rows that failed because of their own request (row -> why): those requests
    # end with that error, every other row's result stands (worker/isolation.py)
    failed_rows: Optional[dict[int, str]] = None
    extra_sample: Any = None  # the sampler's device output until host results are filled
    # GPU: set while the step is in flight; call it (off the event loop) to wait for the
    # GPU and fill the lists above. None once filled, and always on the CPU.
    wait: Optional[Callable[[], "StepOutput"]] = None


