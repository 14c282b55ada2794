"""Build the demo's built-in teacher (miniplm/demo/assets/demo-teacher): the demo's corpus steps,
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
import json
import os
import pathlib
import platform
import shutil
import subprocess

from miniplm import io
from miniplm.demo.teacher import ASSET, COMMAND, FILES, PROVENANCE, RECIPE, file_sha256
from miniplm.pipeline.run import DEMO_CONFIG, Steps, load_pipeline, prepare_data, step_markers, train_model


def build(workdir: str, output: str = ASSET) -> dict:
    """Train the built-in teacher in `workdir` (the demo's corpus steps, then the teacher) and
    write its checkpoint and provenance to `output`. Returns the provenance."""
    import torch
    import transformers

    from miniplm.runtime import init_ray

    cfg = load_pipeline(DEMO_CONFIG, [f"output={workdir}", *RECIPE])
    os.makedirs(cfg.output, exist_ok=True)
    init_ray()
    step = Steps(step_markers(cfg))
    data = prepare_data(cfg, step)
    final = train_model(cfg, step, "teacher", data)
    done = io.read_json(os.path.join(cfg.output, "teacher", "_done.json"))
    os.makedirs(output, exist_ok=True)
    for name in FILES:
        shutil.copyfile(os.path.join(final, name), os.path.join(output, name))
    sample = io.read_json(os.path.join(cfg.output, "sample", io.MANIFEST))
    record = {
        "command": COMMAND,
        "miniplm_commit": _git_commit(),
        "teacher": f"{cfg.teacher.preset}, {cfg.teacher.tokens:,} tokens of D_ref",
        "corpus": {k: sample[k] for k in ("fingerprint", "python", "bytes", "packages")},
        "split": {"fraction": cfg.reference.fraction, "seed": cfg.reference.seed, "key": "text",
                  "max_chars": cfg.corpus.max_chars, "d_ref_fingerprint": io.read_json(
                      os.path.join(data["d_ref"], io.MANIFEST))["fingerprint"]},
        "train": done["train"],
        "final_metrics": done["metrics"],
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "machine": platform.machine()},
        "files": {name: file_sha256(os.path.join(output, name)) for name in FILES},
    }
    # last, whole or not at all (a sibling file renamed: it ships, so no _tmp/ folder beside it)
    staging = os.path.join(output, f".{PROVENANCE}.partial")
    with open(staging, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, os.path.join(output, PROVENANCE))
    print(step.table())
    print(f"built-in teacher written to {output}: model.safetensors sha256 {record['files']['model.safetensors']}")
    return record


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=os.path.dirname(__file__),
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/demo-teacher-build", help="run folder for the corpus and training")
    parser.add_argument("--output", default=ASSET, help=f"where the teacher goes (default: {ASSET})")
    args = parser.parse_args()
    build(str(pathlib.Path(args.workdir).resolve()), args.output)


if __name__ == "__main__":
    main()
