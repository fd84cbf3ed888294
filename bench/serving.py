"""Moved to asgl/bench/serving.py (installed with the package: `asgl bench`); this script
stays so that `python bench/serving.py` and the scripts that run it keep working."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asgl.bench.serving import *  # noqa: E402,F401,F403
from asgl.bench.serving import main  # noqa: E402

if __name__ == "__main__":
    result = main()
    sys.exit(1 if isinstance(result, dict) and result.get("failed") else 0)
