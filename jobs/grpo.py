"""Ray job: grpo. `ray job submit --working-dir . -- python -m jobs.grpo --storage STORAGE ...`."""

import sys

from icdray.cli import main

if __name__ == "__main__":
    sys.exit(main(["grpo", *sys.argv[1:]]))
