"""Ray job: the whole pipeline up to the report (skips stages whose artifacts exist; --force reruns them).

`ray job submit --working-dir . -- python -m jobs.pipeline [--storage DIR] [--config FILE] [--set key=value]`
"""

import sys

from icdray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
