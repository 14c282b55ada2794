"""Ray job entrypoint for the select stage (flags: `miniplm select --help`):

    ray job submit --working-dir . -- python jobs/select.py ...
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the working dir's miniplm

from miniplm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["select", *sys.argv[1:]]))
