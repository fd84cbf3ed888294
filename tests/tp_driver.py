"""Run one engine in this process and print its greedy outputs (for the TP/DP tests).

    python tests/tp_driver.py < {"options": {...EngineConfig...}, "prompts": [...],
                                 "params": {...SamplingParams...}}

Prints one line `RESULT <json>`: each prompt's output ids. Run as a subprocess so that the
tensor-parallel process group (rank 0 lives here) never touches the pytest process.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    spec = json.load(sys.stdin)
    from asgl.engine.loop.sync_engine import LLM

    llm = LLM(**spec["options"])
    try:
        outs = llm.generate(spec["prompts"], spec["params"])
        print("RESULT " + json.dumps([o.output_ids for o in outs]), flush=True)
    finally:
        llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
