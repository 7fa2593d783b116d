"""Ray job: sft. `ray job submit --working-dir . -- python -m jobs.sft --storage STORAGE ...`."""

import sys

from icdray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
