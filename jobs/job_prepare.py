"""Ray job entrypoint for `miniplm prepare` (flags: `miniplm prepare --help`):

    ray job submit --working-dir . -- python jobs/job_prepare.py ...

Ray puts the job's working directory on PYTHONPATH, so its `miniplm` is the one imported.
"""

import sys

from miniplm.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
