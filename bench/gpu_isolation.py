"""One bad request in a batch of 32 on the GPU path (issue 16; tests/test_isolation.py is
the CPU twin with the embedded model).

    python bench/gpu_isolation.py [--device cuda] [--attention-backend triton]

A dummy-weight SmolLM2-135M (no checkpoint needed), greedy, 32 token-id prompts; request 7
carries a marker (a tiny logit_bias, present in the fault-free run too). Faults injected on
its row: NaN logits, and the sampler raising. On CUDA the step is launched asynchronously,
results come back through pinned copies and a CUDA event (step_io.PendingResults), and
decode runs from CUDA graphs. Each check prints `[check] isolation <fault>: ok` when the
marked request ended with an error and the other 31 outputs equal the fault-free run in
which the marked request ends at the same step (GPU kernels are not batch-invariant); the
exit status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from asgl.engine.loop.sync_engine import LLM  # noqa: E402
from asgl.engine.sampling.penalties import SparseLogitEdits  # noqa: E402

N, BAD, MARK = 32, 7, 0.125
GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
MARKED = dict(GREEDY, logit_bias={"5": MARK})
_real_apply = SparseLogitEdits.apply


def _marked_rows(edits: SparseLogitEdits) -> torch.Tensor:
    if edits.bias_index is None:
        return torch.empty(0, dtype=torch.int64, device=edits.bias_values.device)
    return edits.bias_index[0][edits.bias_values == MARK]


def nan_logits(self, logits):
    _real_apply(self, logits)
    logits[_marked_rows(self)] = float("nan")


def sampler_raises(self, logits):
    # (a host sync here, test-only: the fault must be raised on the row's own batch)
    if _marked_rows(self).numel():
        raise ValueError("injected sampling fault")
    _real_apply(self, logits)


def run_batch(llm: LLM, prompts: list[list[int]], marked: dict = MARKED) -> list:
    async def run():
        return await asyncio.gather(*(llm.engine.generate(input_ids=p, sampling_params=(
            marked if i == BAD else GREEDY)) for i, p in enumerate(prompts)))
    return asyncio.run_coroutine_threadsafe(run(), llm._loop).result()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="auto")
    p.add_argument("--attention-backend", default=None)
    args = p.parse_args()
    t0 = time.perf_counter()
    llm = LLM(model_path="HuggingFaceTB/SmolLM2-135M-Instruct", load_format="dummy",
              skip_tokenizer_init=True, device=args.device, max_total_tokens=32768,
              attention_backend=args.attention_backend, debug_check_integrity=True)
    print(f"engine on {llm.engine.runner.device} in {time.perf_counter() - t0:.1f}s, "
          f"CUDA graphs: {llm.engine.runner.graph_runner is not None}", flush=True)
    prompts = [[100 + 37 * i + j for j in range(12 + i % 5)] for i in range(N)]
    failed = 0
    try:
        # GPU kernels are not batch-invariant (a matmul's reduction order follows its row
        # count) and dummy weights give near-ties, so the reference keeps the batches of
        # the faulty run, where the marked request fails at its first sampled step and
        # (overlap) is already in the next one: two tokens end it at the same point
        clean = run_batch(llm, prompts, dict(MARKED, max_new_tokens=2))
        full = run_batch(llm, prompts)
        for name, fault in (("nan-logits", nan_logits), ("sampler-raises", sampler_raises)):
            SparseLogitEdits.apply = fault
            try:
                faulty = run_batch(llm, prompts)
            finally:
                SparseLogitEdits.apply = _real_apply
            same = [faulty[i].output_ids == clean[i].output_ids for i in range(N) if i != BAD]
            ended = faulty[BAD].finish_reason
            ok = all(same) and ended["type"] == "abort" and bool(ended.get("message"))
            again = run_batch(llm, prompts)  # the engine serves on, outputs unchanged
            ok = ok and all(a.output_ids == c.output_ids for a, c in zip(again, full))
            ok = ok and llm.engine.scheduler.is_idle_and_clean()
            failed += not ok
            print(f"[check] isolation {name}: {'ok' if ok else 'FAILED'} "
                  f"({sum(same)}/{N - 1} others equal; marked: {ended})", flush=True)
    finally:
        llm.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
