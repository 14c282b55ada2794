"""Ray job entrypoint for `miniplm eval` (flags: `miniplm eval --help`):

    ray job submit --working-dir . -- python jobs/job_eval.py ...

Ray puts the job's working directory on PYTHONPATH, so its `miniplm` is the one imported.
"""

import sys

from miniplm.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
