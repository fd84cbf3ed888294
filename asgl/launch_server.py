"""`python -m asgl.launch_server [options]`: the same as `asgl serve`, for SGLang users."""

import sys

from asgl.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
