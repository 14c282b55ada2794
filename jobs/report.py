"""Ray job entrypoint for the report stage (flags: `miniplm report --help`):

    ray job submit --working-dir . -- python jobs/report.py ...
"""

import pathlib
import sys

# Put the repo root (the job's working dir: its miniplm) first, and drop jobs/ from the path:
# jobs/report.py would otherwise shadow the standard library's `select` module.
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from miniplm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
