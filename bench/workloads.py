"""Moved to asgl/bench/workloads.py (installed with the package: `asgl bench`); this script
stays so that `python bench/workloads.py` and the scripts that run it keep working."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asgl.bench.workloads import *  # noqa: E402,F401,F403
