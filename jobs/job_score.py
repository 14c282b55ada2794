"""Ray job entrypoint for `miniplm score` (flags: `miniplm score --help`):

    ray job submit --working-dir . -- python jobs/job_score.py ...

Ray puts the job's working directory on PYTHONPATH, so its `miniplm` is the one imported.
"""

import sys

from miniplm.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
