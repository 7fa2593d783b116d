"""Ray job: baselines (frequency prior, TF-IDF, encoder). `ray job submit --working-dir . -- python -m jobs.baseline --storage STORAGE`."""

import sys

from icdray.cli import main

if __name__ == "__main__":
    sys.exit(main(["baseline", *sys.argv[1:]]))
