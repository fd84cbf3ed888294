"""Run `asgl serve` with a sampling profiler on its event-loop thread (no ptrace needed).

    python bench/loop_sampler.py --out prof.txt [--delay 15 | --trigger FILE] \
        [--duration 20] [--hz 200] -- serve --model-path ... (the `asgl` command line)

A daemon thread wakes `--hz` times a second for `--duration` seconds, starting `--delay`
seconds after start or, with `--trigger`, once FILE exists (`touch` it when the load is
on), and records the main thread's Python stack (`sys._current_frames`); the stacks are
written in py-spy's raw format ("thread (id): MainThread;outer;...;inner count"), which
`bench/pyspy_summary.py --thread MainThread` reads. A stack whose innermost frame is the
event loop's `run` means the loop was waiting or inside uvloop's C code. The sampler
holds the GIL for a few microseconds per sample (~0.1% of the loop at 200 Hz).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import threading
import time


def _stack(frame) -> str:
    names = []
    while frame is not None:
        code = frame.f_code
        parts = code.co_filename.replace("\\", "/").split("/")
        # as py-spy names them: the path below site-packages or the source root
        for root in ("site-packages", "python3.11", "python3.12", "python3.13"):
            if root in parts:
                parts = parts[parts.index(root) + 1:]
                break
        else:
            if "asgl" in parts:
                parts = parts[parts.index("asgl"):]
        names.append(f"{code.co_qualname if hasattr(code, 'co_qualname') else code.co_name} "
                     f"({'/'.join(parts)}:{frame.f_lineno})")
        frame = frame.f_back
    return ";".join(reversed(names))


def _sample(out: str, delay: float, trigger: str | None, duration: float, hz: float,
            main_id: int) -> None:
    time.sleep(delay)
    while trigger and not os.path.exists(trigger):
        time.sleep(0.1)
    counts: collections.Counter = collections.Counter()
    end = time.monotonic() + duration
    period = 1.0 / hz
    while time.monotonic() < end:
        frame = sys._current_frames().get(main_id)
        if frame is not None:
            counts[_stack(frame)] += 1
        time.sleep(period)
    with open(out, "w") as f:
        for stack, n in counts.items():
            f.write(f"thread ({main_id}): MainThread;{stack} {n}\n")
    print(f"loop_sampler: {sum(counts.values())} samples written to {out}", file=sys.stderr)


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--trigger", default=None, help="start sampling once this file exists")
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--hz", type=float, default=200.0)
    args = p.parse_args(argv[:split])
    threading.Thread(target=_sample, args=(args.out, args.delay, args.trigger, args.duration, args.hz,
                                           threading.get_ident()),
                     daemon=True, name="loop-sampler").start()
    from asgl.cli import main as cli_main
    sys.argv = ["asgl", *argv[split + 1:]]
    sys.exit(cli_main())


if __name__ == "__main__":
    main()
