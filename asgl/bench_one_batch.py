"""`python -m asgl.bench_one_batch`: the same as `asgl bench one-batch`, as SGLang users type it."""

import sys

from asgl.bench.one_batch import main

if __name__ == "__main__":
    result = main(sys.argv[1:], "python -m asgl.bench_one_batch")
    sys.exit(1 if isinstance(result, dict) and result.get("failed") else 0)
