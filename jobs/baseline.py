"""Ray job: TF-IDF baseline. `ray job submit --working-dir . -- python -m jobs.baseline --data STORAGE`."""

import sys

from icdray.cli import main

if __name__ == "__main__":
    sys.exit(main(["baseline", *sys.argv[1:]]))
