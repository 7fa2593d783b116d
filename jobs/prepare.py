"""Ray job: prepare. `ray job submit --working-dir . -- python -m jobs.prepare --mimic DIR --storage STORAGE`."""

import sys

from icdray.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
