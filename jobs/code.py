"""Ray job: batch coding. `ray job submit --working-dir . -- python -m jobs.code --input NOTES --out DIR [--fhir]`."""

import sys

from icdray.cli import main

if __name__ == "__main__":
    sys.exit(main(["code", *sys.argv[1:]]))
