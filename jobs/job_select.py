"""Ray job entrypoint for `miniplm select` (flags: `miniplm select --help`):

    ray job submit --working-dir . -- python jobs/job_select.py ...

Ray puts the job's working directory on PYTHONPATH, so its `miniplm` is the one imported.
"""

import sys

from miniplm.cli import main

if __name__ == "__main__":
    sys.exit(main(["select", *sys.argv[1:]]))
