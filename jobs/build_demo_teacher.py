"""Build the demo's built-in teacher (miniplm/assets/demo-teacher): the demo's corpus steps,
then the teacher's training (mini preset, 2.5M tokens of D_ref; about 9 minutes on 2 CPUs).
It writes the checkpoint, its tokenizer and provenance.json (the command, corpus, split,
training config and the sha256 of every file).

    python jobs/build_demo_teacher.py [--workdir runs/demo-teacher-build] [--output FOLDER]

With the default --output it replaces the shipped teacher (in a source checkout). Give another
folder to keep the shipped one and run the demo with yours as an ordinary checkpoint:

    miniplm run miniplm/configs/demo.yaml --set output=runs/demo-mine --set teacher.checkpoint=FOLDER \
        --set tokenizer=FOLDER
"""

import argparse
import pathlib

from miniplm.demo_build import build
from miniplm.demo_teacher import ASSET


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/demo-teacher-build", help="run folder for the corpus and training")
    parser.add_argument("--output", default=ASSET, help=f"where the teacher goes (default: {ASSET})")
    args = parser.parse_args()
    build(str(pathlib.Path(args.workdir).resolve()), args.output)


if __name__ == "__main__":
    main()
