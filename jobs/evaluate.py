"""Ray job: evaluate. `ray job submit --working-dir . -- python -m jobs.evaluate --storage STORAGE ...`."""

import sys

from icdray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
