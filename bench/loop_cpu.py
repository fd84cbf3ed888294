"""Event-loop CPU per decode step: the scheduler's Python, measured on the CPU.

    python bench/loop_cpu.py [--batch 256] [--steps 48] [--stream] [--sampled] [--detok]
                             [--baseline DIR] [--profile out.prof] [--out r.jsonl]

Runs the in-process Engine on a tiny dummy model (`tiny-llama`, CPU) with `--batch`
requests decoding together, and times on the loop thread (time.thread_time) what each
decode step at full batch costs: schedule, submit (sampling batch + table writes), apply
(apply_step_output + finish_step), and the loop thread's whole CPU time between steps
(which adds the consumers woken by stream chunks and asyncio's own work). The request
table's writes are tracked as on the GPU path. The forward pass runs on the worker
thread and is not counted. `--profile` writes a cProfile of those three calls.

The server's path is `--stream --sampled --detok`: every request is consumed as the HTTP
routes do (`generate_into`: chunks handed over inside the step; a tree without it:
`generate_stream`), samples with temperature / top-p / a seed, and
is detokenized incrementally (SmolLM2's tokenizer). `--baseline DIR` runs the same
measurement first on the tree in DIR (e.g. `git archive` of an older commit) in a
subprocess, and prints both.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import statistics
import sys
import time

# the repository's root first (bench/ is no package on the path), unless measuring another
# tree (--baseline), whose root PYTHONPATH names
if not os.environ.get("ASGL_BENCH_NO_PATH"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
else:
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def _engine_class():
    try:
        from asgl.engine.loop.engine import Engine
    except ImportError:  # a tree from before the engine was cut by owner (--baseline)
        from asgl.engine.engine import Engine
    return Engine


def _track_table_writes(engine) -> None:
    """Queue the request table's writes as on the GPU path (the device replays them)."""
    table = engine.memory.table if hasattr(engine, "memory") else engine.req_pool
    table.track_writes = True


async def main_async(args) -> dict:
    engine = await _engine_class()(model_path="tiny-llama", load_format="dummy", device="cpu",
                                   skip_tokenizer_init=not args.detok,
                                   max_running_requests=args.batch, random_seed=0).start()
    _track_table_writes(engine)
    prof = cProfile.Profile(time.thread_time) if args.profile else None
    timer = _Timer(engine, args.batch, prof)
    sp = {"max_new_tokens": args.steps, "ignore_eos": True, "temperature": 0.0}
    if args.sampled:
        sp.update(temperature=0.8, top_p=0.95, top_k=50)
    prompts = [[(7 * i + j) % 4000 + 10 for j in range(args.prompt_len)]
               for i in range(args.batch)]

    async def one(i: int, prompt: list[int]) -> int:
        params = dict(sp, seed=i) if args.sampled else sp
        if not args.stream:
            return len((await engine.generate(input_ids=prompt, sampling_params=params))
                       .output_ids)
        n = 0
        if hasattr(engine, "generate_into"):  # the server routes' path, where it exists
            def take(chunk) -> None:
                nonlocal n
                n += len(chunk.token_ids)

            await engine.generate_into(take, input_ids=prompt, sampling_params=params)
            return n
        async for chunk in engine.generate_stream(input_ids=prompt, sampling_params=params):
            n += len(chunk.token_ids)
        return n

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - t0
    await engine.shutdown()
    assert all(n == args.steps for n in counts), counts[:8]
    if prof is not None:
        prof.dump_stats(args.profile)
    rec = {"bench": "loop_cpu", "batch": args.batch, "decode_steps": args.steps,
           "stream": args.stream and ("generate_into" if hasattr(engine, "generate_into")
                                      else "generate_stream"), "sampled": args.sampled, "detok": args.detok,
           "wall_s": round(wall, 2), **timer.summary()}
    return rec


def _line(rec: dict) -> str:
    return (f"bs {rec['batch']}: schedule {rec['schedule_us_per_req']} + submit "
            f"{rec['submit_us_per_req']} + apply {rec['apply_us_per_req']} = "
            f"{rec['sum_us_per_req']} us/request/step ({rec['sum_ms_per_step']} ms/step); "
            f"loop thread all-in {rec.get('loop_thread_us_per_req')} us/request/step")


def _run_baseline(args) -> dict:
    """This bench, on the tree in args.baseline, in a subprocess; returns its record."""
    import json
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".jsonl") as f:
        cmd = [sys.executable, os.path.abspath(__file__), "--batch", str(args.batch),
               "--steps", str(args.steps), "--prompt-len", str(args.prompt_len),
               "--out", f.name] + [flag for flag in ("--stream", "--sampled", "--detok")
                                   if getattr(args, flag[2:])]
        env = dict(os.environ, PYTHONPATH=os.path.abspath(args.baseline), ASGL_BENCH_NO_PATH="1")
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        return json.loads(open(f.name).read().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=48, help="output tokens per request")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--stream", action="store_true", help="consume with generate_stream")
    p.add_argument("--sampled", action="store_true", help="temperature / top-p / top-k, seeded")
    p.add_argument("--detok", action="store_true", help="load the tokenizer and detokenize")
    p.add_argument("--baseline", default=None, help="also measure the tree in this folder")
    p.add_argument("--profile", default=None, help="write a cProfile of the timed calls here")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    base = _run_baseline(args) if args.baseline else None
    rec = asyncio.run(main_async(args))
    if base is not None:
        print(f"[loop_cpu] before ({args.baseline}): {_line(base)}")
        rec["baseline"] = {k: base.get(k) for k in ("sum_us_per_req", "loop_thread_us_per_req",
                                                    "schedule_us_per_req", "submit_us_per_req",
                                                    "apply_us_per_req")}
        rec["loop_thread_ratio"] = round(rec["loop_thread_us_per_req"]
                                         / base["loop_thread_us_per_req"], 3)
    print(f"[loop_cpu] {'after: ' if base else ''}{_line(rec)}")
    if base is not None:
        print(f"[loop_cpu] loop thread per request per step: {rec['loop_thread_ratio']}x before")
    append_record(args.out, rec)


if __name__ == "__main__":
    main()
