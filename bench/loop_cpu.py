"""Event-loop CPU per decode step: the scheduler's Python, measured on the CPU.

    python bench/loop_cpu.py [--batch 256] [--steps 48] [--profile out.prof] [--out r.jsonl]

Runs the in-process Engine on a tiny dummy model (`tiny-llama`, CPU) with `--batch`
requests decoding together, and times on the loop thread (time.thread_time) what each
decode step at full batch costs: schedule, submit (sampling batch + table writes), apply
(apply_step_output + finish_step), and the loop thread's whole CPU time between steps
(which adds the consumers woken by stream chunks and asyncio's own work). The request
table's writes are tracked as on the GPU path. The forward pass runs on the worker
thread and is not counted. `--profile` writes a cProfile of those three calls.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.workloads import append_record  # noqa: E402


class _Timer:
    """Wraps schedule / _submit_step / _apply of one engine; keeps per-step CPU times of
    full decode batches."""

    def __init__(self, engine, batch: int, profile: cProfile.Profile | None):
        self.batch, self.profile = batch, profile
        self.rows: list[dict] = []  # one per full decode step
        self.loop_marks: list[float] = []  # loop-thread CPU time at each full decode apply
        self._cur: dict = {}
        sched = engine.scheduler
        self._orig = (sched.schedule, engine._submit_step, engine._apply)
        sched.schedule = self._wrap("schedule", self._orig[0])
        engine._submit_step = self._wrap("submit", self._orig[1])
        engine._apply = self._wrap("apply", self._orig[2])

    def _full(self, batch) -> bool:
        return getattr(batch, "decode_only", False) and len(batch.reqs) == self.batch

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            prof = self.profile
            t = time.thread_time()
            if prof is not None:
                prof.enable()
            out = fn(*args, **kwargs)
            if prof is not None:
                prof.disable()
            dt = time.thread_time() - t
            batch = out if name == "schedule" else args[0]
            if self._full(batch):
                d = self._cur.setdefault(id(batch), {})
                d[name] = dt
                if name == "apply":
                    self.rows.append(self._cur.pop(id(batch)))
                    self.loop_marks.append(time.thread_time())
            return out
        return timed

    def summary(self) -> dict:
        rows = [r for r in self.rows if len(r) == 3][2:]  # the first steps warm caches
        us = lambda xs: 1e6 * statistics.median(xs) / self.batch  # noqa: E731
        out = {"steps": len(rows)}
        for k in ("schedule", "submit", "apply"):
            out[f"{k}_us_per_req"] = round(us([r[k] for r in rows]), 2)
        out["sum_us_per_req"] = round(us([sum(r.values()) for r in rows]), 2)
        marks = self.loop_marks[2:]
        if len(marks) > 2:
            diffs = [b - a for a, b in zip(marks, marks[1:])]
            out["loop_thread_us_per_req"] = round(us(diffs), 2)
        out["sum_ms_per_step"] = round(out["sum_us_per_req"] * self.batch / 1e3, 3)
        return out


async def main_async(args) -> dict:
    from asgl.engine.loop.engine import Engine

    engine = await Engine(model_path="tiny-llama", load_format="dummy", device="cpu",
                          skip_tokenizer_init=True, max_running_requests=args.batch,
                          random_seed=0).start()
    engine.memory.table.track_writes = True  # as on the GPU path (the device replays them)
    prof = cProfile.Profile(time.thread_time) if args.profile else None
    timer = _Timer(engine, args.batch, prof)
    sp = {"max_new_tokens": args.steps, "ignore_eos": True, "temperature": 0.0}
    prompts = [[(7 * i + j) % 4000 + 10 for j in range(args.prompt_len)]
               for i in range(args.batch)]
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(engine.generate(input_ids=p, sampling_params=sp)
                                  for p in prompts))
    wall = time.perf_counter() - t0
    await engine.shutdown()
    assert all(len(o.output_ids) == args.steps for o in outs)
    if prof is not None:
        prof.dump_stats(args.profile)
    rec = {"bench": "loop_cpu", "batch": args.batch, "decode_steps": args.steps,
           "wall_s": round(wall, 2), **timer.summary()}
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=48, help="output tokens per request")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--profile", default=None, help="write a cProfile of the timed calls here")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rec = asyncio.run(main_async(args))
    print(f"[loop_cpu] bs {rec['batch']}: schedule {rec['schedule_us_per_req']} + submit "
          f"{rec['submit_us_per_req']} + apply {rec['apply_us_per_req']} = "
          f"{rec['sum_us_per_req']} us/request/step ({rec['sum_ms_per_step']} ms/step); "
          f"loop thread all-in {rec.get('loop_thread_us_per_req')} us/request/step")
    append_record(args.out, rec)


if __name__ == "__main__":
    main()
