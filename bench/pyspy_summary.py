"""Summarize a `py-spy record --format raw --threads` profile: where one thread's time goes.

    python bench/pyspy_summary.py prof.txt [--thread MainThread] [--top 40]

Prints, for the samples of the chosen thread (the event loop is the process's main thread
under `asgl serve`), the share of samples per function (self: the innermost frame; total:
anywhere on the stack), and the share per top-level component (asgl module folder, aiohttp,
asyncio, idle), which is what a profile of the serving path is read for.
"""

from __future__ import annotations

import argparse
import collections
import re

# "func (path/to/file.py:123)" -> ("func", "path/to/file.py")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")
_IDLE = ("select", "poll", "epoll", "_run_once", "run_forever")


def _component(file: str) -> str:
    # py-spy names files by their path below site-packages / the source root
    parts = file.split("/")
    if len(parts) < 2:
        return "other"  # a top-level module of the standard library (threading.py, ...)
    if parts[0] == "asgl":
        return "/".join(parts[:-1])
    return parts[0]


def summarize(path: str, thread: str, top: int) -> str:
    self_count: collections.Counter = collections.Counter()
    total_count: collections.Counter = collections.Counter()
    comp_count: collections.Counter = collections.Counter()
    samples = 0
    for line in open(path):
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = stack.split(";")
        if frames and frames[0].startswith(("thread (", "process (")):
            head = frames[0]
            if thread and thread not in head:
                # py-spy names threads by id; MainThread is the first one it sees
                continue
            frames = frames[1:]
        samples += n
        parsed = [m.groupdict() if (m := _FRAME.match(f)) else {"func": f, "file": ""}
                  for f in frames]
        if not parsed:
            continue
        inner = parsed[-1]
        self_count[f"{inner['func']} ({inner['file'].rsplit('/', 1)[-1]})"] += n
        for key in {f"{p['func']} ({p['file'].rsplit('/', 1)[-1]})" for p in parsed}:
            total_count[key] += n
        # component: the innermost frame that is not the standard library's glue
        comp = "other"
        for p in reversed(parsed):
            c = _component(p["file"])
            if c not in ("other", "asyncio", "uvloop"):
                comp = c
                break
        if inner["func"] in _IDLE or "select" in inner["func"]:
            comp = "idle (polling)"
        comp_count[comp] += n
    out = [f"{samples} samples of thread {thread or 'all'}"]
    out.append("\nby component (innermost library frame):")
    for k, v in comp_count.most_common(top):
        out.append(f"  {100 * v / max(samples, 1):5.1f}%  {k}")
    out.append("\nself:")
    for k, v in self_count.most_common(top):
        out.append(f"  {100 * v / max(samples, 1):5.1f}%  {k}")
    out.append("\ntotal (on the stack):")
    for k, v in total_count.most_common(top):
        out.append(f"  {100 * v / max(samples, 1):5.1f}%  {k}")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("profile")
    p.add_argument("--thread", default="", help="a substring of the thread's header line")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    print(summarize(args.profile, args.thread, args.top))


if __name__ == "__main__":
    main()
