"""Ray job: demo data. `ray job submit --working-dir . -- python -m jobs.demo_data --out DIR --admissions N`."""

import sys

from icdray.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo-data", *sys.argv[1:]]))
