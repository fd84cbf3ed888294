"""Tensor-parallel state and collectives.

One process per rank (see DESIGN.md). Every rank of the world is one tensor-parallel rank:
data parallelism (`--dp`) runs whole engines as separate processes, each with its own world.
Without `torch.distributed` initialized the state is rank 0 of size 1, and the
collectives are no-ops, so single-device code pays nothing for TP support.

Layers read `get_tp_rank()` / `get_tp_size()` when they are built, so the process group
must be set up (`init_distributed`) before the model is constructed.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from typing import Iterator, Optional

import torch
import torch.distributed as dist

_TP_GROUP: Optional[dist.ProcessGroup] = None
# A gloo group over the same ranks for host-side control traffic (each step's batch from
# rank 0, start-up agreements). Separate from the device group because (1) with NCCL the
# step header must travel on the host, and (2) ranks >= 1 wait on it for as long as the
# server idles, so it gets a timeout far beyond the device group's.
_CPU_GROUP: Optional[dist.ProcessGroup] = None
_CONTROL_TIMEOUT = timedelta(days=365)
# Set while building a shape template of the unsharded model (see single_rank_view).
_SINGLE_RANK_VIEW = False


def init_distributed(world_size: int, rank: int, init_method: str = "env://",
                     backend: Optional[str] = None, device: torch.device | str | None = None,
                     timeout_s: float = 600.0) -> None:
    """Join the process group of `world_size` tensor-parallel ranks.

    `init_method`: "tcp://host:port" (rank 0's `--dist-init-addr`, works across nodes),
    "file:///path" (tests) or "env://". `backend` defaults to NCCL for CUDA devices and gloo
    otherwise. A CUDA `device` is made current first, since NCCL binds to it.
    """
    global _TP_GROUP, _CPU_GROUP
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method=init_method, world_size=world_size,
                                rank=rank, timeout=timedelta(seconds=timeout_s))
    if dist.get_world_size() != world_size:
        raise RuntimeError(f"process group has {dist.get_world_size()} ranks, expected {world_size}")
    _TP_GROUP = dist.group.WORLD
    # new_group is collective: every rank creates it here, in the same order.
    _CPU_GROUP = dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT)


def destroy_distributed() -> None:
    global _TP_GROUP, _CPU_GROUP
    _TP_GROUP = _CPU_GROUP = None
    if dist.is_initialized():
        dist.destroy_process_group()


def get_tp_group() -> Optional[dist.ProcessGroup]:
    """The TP process group, or None when running on one rank."""
    if _TP_GROUP is None and dist.is_initialized():
        return dist.group.WORLD
    return _TP_GROUP


def get_cpu_group() -> Optional[dist.ProcessGroup]:
    """The gloo control group over the TP ranks (None on one rank)."""
    return _CPU_GROUP if dist.is_initialized() else None


def get_tp_size() -> int:
    if _SINGLE_RANK_VIEW:
        return 1
    group = get_tp_group()
    return 1 if group is None else dist.get_world_size(group)


def get_tp_rank() -> int:
    if _SINGLE_RANK_VIEW:
        return 0
    group = get_tp_group()
    return 0 if group is None else dist.get_rank(group)


@contextlib.contextmanager
def single_rank_view() -> Iterator[None]:
    """Layers built inside see rank 0 of 1: used to get the unsharded parameter shapes (on
    the meta device) while the process group is up. Build nothing else meanwhile."""
    global _SINGLE_RANK_VIEW
    prev, _SINGLE_RANK_VIEW = _SINGLE_RANK_VIEW, True
    try:
        yield
    finally:
        _SINGLE_RANK_VIEW = prev


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the TP ranks (in place when there is more than one)."""
    if get_tp_size() == 1:
        return x
    dist.all_reduce(x, group=get_tp_group())
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, in rank order."""
    world = get_tp_size()
    if world == 1:
        return x
    dim = dim % x.dim()
    x = x.contiguous()
    if x.is_cuda:
        # One NCCL call into a [world * d0, ...] buffer, then move the rank axis to `dim`.
        out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x, group=get_tp_group())
        return torch.cat(out.chunk(world, dim=0), dim=dim) if dim != 0 else out
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=get_tp_group())  # gloo has no all_gather_into_tensor
    return torch.cat(parts, dim=dim)
