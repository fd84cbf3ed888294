"""RunningSet: the running requests' per-request state as arrays indexed by table row.

Owner: the scheduler (event loop). A request's row is its request-table row
(`req.req_pool_idx`); everything here is written once when the request is admitted
(sampling parameters, its seed's RNG key, limits, flags) and read each step with a fixed
number of array operations over the step's rows, instead of a Python pass over the
requests. Per-request Python stays for what is truly per request (detokenization, stream
delivery, grammar, logprobs, stop strings, penalties' token lists).

`check` verifies that the arrays mirror every live request (tests run it after each step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from asgl.engine.sampling.rng import seed_key

if TYPE_CHECKING:
    from asgl.engine.scheduler.req import Req


class RunningSet:
    def __init__(self, num_rows: int, vocab_size: int):
        self.vocab_size = vocab_size
        n = num_rows
        self.temperature = np.ones(n, np.float32)  # floored; 1.0 on greedy rows
        self.top_k = np.full(n, vocab_size, np.int64)  # vocab_size where off
        self.top_p = np.full(n, np.inf, np.float32)  # +inf where off
        self.min_p = np.zeros(n, np.float32)
        self.rng_key = np.zeros(n, np.int64)
        self.greedy = np.ones(n, bool)
        self.seeded = np.zeros(n, bool)  # the user gave a seed (and the row samples)
        # rows whose sampling needs per-request Python: penalties, logit_bias,
        # min_new_tokens, logprobs
        self.slow = np.zeros(n, bool)

    def admit(self, req: "Req") -> None:
        """Write `req`'s row (it holds a table row now)."""
        row, sp = req.req_pool_idx, req.sampling
        greedy = sp.is_greedy
        self.greedy[row] = greedy
        self.temperature[row] = 1.0 if greedy else max(sp.temperature, 1e-5)
        self.top_k[row] = sp.top_k if sp.top_k > 0 else self.vocab_size
        self.top_p[row] = sp.top_p if sp.top_p < 1.0 else np.inf
        self.min_p[row] = sp.min_p
        self.rng_key[row] = seed_key(req.seed)
        self.seeded[row] = sp.seed is not None and not greedy
        self.slow[row] = (sp.has_penalties or bool(sp.logit_bias) or sp.min_new_tokens > 0
                          or req.return_logprob)

    def check(self, running: Sequence["Req"]) -> None:
        """Raise AssertionError unless every running request's row holds its values."""
        for req in running:
            if req.req_pool_idx is None:
                continue
            row, sp = req.req_pool_idx, req.sampling
            greedy = sp.is_greedy
            want = (greedy, np.float32(1.0 if greedy else max(sp.temperature, 1e-5)),
                    sp.top_k if sp.top_k > 0 else self.vocab_size,
                    np.float32(sp.top_p) if sp.top_p < 1.0 else np.inf, np.float32(sp.min_p),
                    seed_key(req.seed), sp.seed is not None and not greedy)
            have = (self.greedy[row], self.temperature[row], self.top_k[row], self.top_p[row],
                    self.min_p[row], self.rng_key[row], self.seeded[row])
            assert tuple(want) == tuple(have), f"{req.rid}: running-set row {row} {have} != {want}"
