"""Ray job entrypoint for the prepare stage (flags: `miniplm prepare --help`):

    ray job submit --working-dir . -- python jobs/prepare.py ...
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the working dir's miniplm

from miniplm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
