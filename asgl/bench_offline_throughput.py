"""`python -m asgl.bench_offline_throughput`: the same as `asgl bench offline`, as SGLang
users type it."""

import sys

from asgl.bench.offline import main

if __name__ == "__main__":
    result = main(sys.argv[1:], "python -m asgl.bench_offline_throughput")
    sys.exit(1 if isinstance(result, dict) and result.get("failed") else 0)
