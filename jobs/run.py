"""Ray job entrypoint for the whole pipeline (`miniplm run`) (flags: `miniplm run --help`):

    ray job submit --working-dir . -- python jobs/run.py CONFIG.yaml
"""

import pathlib
import sys

# Put the repo root (the job's working dir: its miniplm) first, and drop jobs/ from the path:
# jobs/run.py CONFIG.yamlld otherwise shadow the standard library's `select` module.
sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

from miniplm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
