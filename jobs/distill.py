"""Ray job: teacher distillation. `ray job submit --working-dir . -- python -m jobs.distill --storage STORAGE`."""

import sys

from icdray.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
