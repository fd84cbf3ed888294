"""Test helpers: drive a model or an attention backend through the real KV pools the way
the scheduler will (allocate slots, fill req_to_token, build a ForwardBatch)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

import torch

from asgl.engine.contracts.forward_batch import ForwardBatch, ForwardMode
from asgl.engine.scheduler.slots import ReqToTokenPool, TokenSlotAllocator
from asgl.engine.worker.kv_cache import KVPool
from asgl.kernels.attention import create_attention_backend


@dataclass
class Seq:
    """One request: its row in req_to_token and how many of its tokens are in the pool."""
    row: int
    cached: int = 0
    slots: list[torch.Tensor] = field(default_factory=list)


class Pools:
    """A KV pool, its allocator and req_to_token table; slots are handed out shuffled when
    `shuffle` is given, so kernels cannot rely on contiguity."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, capacity: int = 512,
                 max_reqs: int = 8, max_context: int = 256, dtype: torch.dtype = torch.float32,
                 shuffle: Optional[torch.Generator] = None, backend: str = "torch",
                 v_head_dim: Optional[int] = None):
        self.kv = KVPool(capacity, num_layers, num_kv_heads, head_dim, dtype, "cpu", v_head_dim)
        self.allocator = TokenSlotAllocator(capacity)
        self.req_to_token = ReqToTokenPool(max_reqs, max_context, "cpu")
        self.backend = create_attention_backend(backend)
        self.shuffle = shuffle
        if shuffle is not None:  # permute the free list once
            free = self.allocator.alloc(capacity)
            self.allocator.free(free[torch.randperm(capacity, generator=shuffle)])

    def new_seq(self) -> Seq:
        row = self.req_to_token.alloc()
        assert row is not None
        return Seq(row)

    def build(self, seqs: list[Seq], new_tokens: list[list[int]],
              mode: Optional[ForwardMode] = None) -> ForwardBatch:
        """A batch where seqs[i] brings new_tokens[i]; logits for every new token."""
        ids, positions, locs, prefix_lens, extend_lens = [], [], [], [], []
        for seq, toks in zip(seqs, new_tokens):
            slots = self.allocator.alloc(len(toks))
            assert slots is not None
            self.req_to_token.write(seq.row, seq.cached, slots)
            ids += toks
            positions += range(seq.cached, seq.cached + len(toks))
            locs.append(slots)
            prefix_lens.append(seq.cached)
            extend_lens.append(len(toks))
            seq.cached += len(toks)
            seq.slots.append(slots)
        if mode is None:
            decode = [p > 0 and e == 1 for p, e in zip(prefix_lens, extend_lens)]
            mode = ForwardMode.DECODE if all(decode) else \
                ForwardMode.MIXED if any(decode) else ForwardMode.EXTEND
        last_rows = list(itertools.accumulate(extend_lens))
        return ForwardBatch.build(
            mode=mode, input_ids=ids, positions=positions, out_cache_loc=torch.cat(locs),
            req_pool_indices=[s.row for s in seqs], prefix_lens=prefix_lens,
            extend_lens=extend_lens, logits_rows=list(range(len(ids))),
            sample_rows=[r - 1 for r in last_rows], device=torch.device("cpu"),
            req_to_token=self.req_to_token.req_to_token, kv_pool=self.kv,
            attn_backend=self.backend)


def encoder_batch(lengths: list[int], backend: str = "torch") -> ForwardBatch:
    """A no-KV-cache (ENCODE) batch of fresh sequences of the given lengths."""
    total = sum(lengths)
    return ForwardBatch.build(
        mode=ForwardMode.ENCODE, input_ids=[0] * total,
        positions=[p for n in lengths for p in range(n)], out_cache_loc=None,
        req_pool_indices=[0] * len(lengths), prefix_lens=[0] * len(lengths),
        extend_lens=list(lengths), logits_rows=[], sample_rows=[], device=torch.device("cpu"),
        attn_backend=create_attention_backend(backend))


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """‖ours − ref‖ / ‖ref‖ in float64."""
    ours, ref = ours.double(), ref.double()
    return float((ours - ref).norm() / ref.norm())


def run_steps(model, plans: list[list[int]], seqs_ids: list[list[int]],
              shuffle_seed: int = 0) -> list[torch.Tensor]:
    """Run `model` over steps where request i brings plans[i][step] tokens of seqs_ids[i]
    (0: absent that step); returns each request's logits for all its tokens, in order."""
    pools = Pools(model.num_layers, model.num_kv_heads, model.head_dim,
                  shuffle=torch.Generator().manual_seed(shuffle_seed))
    if getattr(model, "kv_latent_dims", None):  # MLA: the pool stores latents
        from asgl.engine.worker.latent_kv_cache import LatentKVPool
        pools.kv = LatentKVPool(pools.kv.num_tokens, model.num_layers, *model.kv_latent_dims,
                                pools.kv.dtype, "cpu")
    seqs = [pools.new_seq() for _ in plans]
    got: list[list[torch.Tensor]] = [[] for _ in plans]
    for step in range(len(plans[0])):
        active = [i for i, plan in enumerate(plans) if plan[step]]
        chunks = [seqs_ids[i][seqs[i].cached:seqs[i].cached + plans[i][step]] for i in active]
        batch = pools.build([seqs[i] for i in active], chunks)
        with torch.no_grad():
            logits = model.compute_logits(model(batch.input_ids, batch.positions, batch))
        for i, part in zip(active, logits.split([len(c) for c in chunks])):
            got[i].append(part)
    return [torch.cat(parts) for parts in got]


def tp_worker(rank: int, world: int, init_file: str, jobs: list, out_path: str) -> None:
    """One tensor-parallel rank (spawned by tests): builds each job's model from
    (model class, HF config, state dict, plans, token ids), runs it, and rank 0 saves
    the logits."""
    from asgl.distributed import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    init_distributed(world, rank, init_method=f"file://{init_file}", backend="gloo")
    try:
        results = []
        for cls, config, state, plans, seqs_ids in jobs:
            model = cls(config).eval()
            model.load_weights(state.items())
            results.append(run_steps(model, plans, seqs_ids))
        if rank == 0:
            torch.save(results, out_path)
    finally:
        destroy_distributed()
