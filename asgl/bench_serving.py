"""`python -m asgl.bench_serving`: the same as `asgl bench serving`, as SGLang users type it."""

import sys

from asgl.bench.serving import main

if __name__ == "__main__":
    result = main(sys.argv[1:], "python -m asgl.bench_serving")
    sys.exit(1 if isinstance(result, dict) and result.get("failed") else 0)
