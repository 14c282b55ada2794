"""Ray job entrypoint for the eval stage (flags: `miniplm eval --help`):

    ray job submit --working-dir . -- python jobs/evaluate.py ...
"""

import pathlib
import sys

# Put the repo root (the job's working dir: its miniplm) first, and drop jobs/ from the path:
# jobs/evaluate.py would otherwise shadow the standard library's `select` module.
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from miniplm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
