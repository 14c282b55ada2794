"""cluster/: the launcher YAML and KubeRay manifests parse, and every RayJob entrypoint names a
job in jobs/ with arguments its parser and config accept."""

from __future__ import annotations

import pathlib
import shlex

import pytest
import yaml

from miniplm.cli import build_parser
from miniplm.config import from_namespace, load

REPO = pathlib.Path(__file__).resolve().parents[1]
MANIFESTS = sorted((REPO / "cluster").glob("*.yaml"))


def test_every_cluster_file_parses():
    assert {p.name for p in MANIFESTS} >= {"ray-cluster.yaml", "raycluster.yaml", "rayjob-score.yaml",
                                          "rayjob-train.yaml", "runtime_env.yaml"}
    for path in MANIFESTS:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path
    launcher = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    assert launcher["head_node_type"] in launcher["available_node_types"]


@pytest.mark.parametrize("path", [p for p in MANIFESTS if p.name.startswith("rayjob")], ids=lambda p: p.name)
def test_rayjob_entrypoint_is_a_valid_job(path):
    job = yaml.safe_load(path.read_text())
    assert job["kind"] == "RayJob"
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"]
    python, script, *args = shlex.split(job["spec"]["entrypoint"])
    assert python == "python" and (REPO / script).is_file()
    stage = pathlib.Path(script).stem
    args = build_parser().parse_args([stage, *args])
    if stage == "train":
        config = str(REPO / args.config) if args.config else None
        cfg = load(__import__("miniplm.train", fromlist=["TrainConfig"]).TrainConfig, config, args.overrides)
        assert cfg.use_gpu and cfg.num_workers >= 1
    else:
        from miniplm.cli import _stages

        cls = _stages()[stage][0]
        cfg = from_namespace(cls, args)
        assert cfg.device == "cuda"
