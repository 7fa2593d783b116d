"""Ray job: the whole pipeline on the embedded default (what `make demo` runs).

`ray job submit --working-dir . -- python -m jobs.pipeline [--storage DIR] [--set key=value]`
"""

import sys

from icdray.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
