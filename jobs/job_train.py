"""Ray job entrypoint for `miniplm train` (flags: `miniplm train --help`):

    ray job submit --working-dir . -- python jobs/job_train.py --config FILE.yaml ...

Ray puts the job's working directory on PYTHONPATH, so its `miniplm` is the one imported.
"""

import sys

from miniplm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
