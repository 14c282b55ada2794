"""Ray job entrypoint for `miniplm run` (flags: `miniplm run --help`):

    ray job submit --working-dir . -- python jobs/job_run.py CONFIG.yaml

Ray puts the job's working directory on PYTHONPATH, so its `miniplm` is the one imported.
"""

import sys

from miniplm.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
