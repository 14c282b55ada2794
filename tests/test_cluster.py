"""cluster/: the launcher YAML and KubeRay manifests parse, every RayJob entrypoint names a
job in jobs/ with arguments its parser and config accept, and every local path a job names is
mounted where the job runs: on the head, whose driver opens the model config, tokenizer and
fingerprints, and on the workers."""

from __future__ import annotations

import dataclasses
import pathlib
import re
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


RAYJOBS = [p for p in MANIFESTS if p.name.startswith("rayjob")]


def stage_config(argv: list[str]):
    """(stage, its resolved config, the --config file or None) for `python jobs/<stage>.py ...`."""
    python, script, *args = argv
    assert python == "python" and (REPO / script).is_file(), argv
    stage = pathlib.Path(script).stem
    args = build_parser().parse_args([stage, *args])
    if stage == "train":
        from miniplm.train import TrainConfig

        config = str(REPO / args.config) if args.config else None
        return stage, load(TrainConfig, config, args.overrides), args.config
    from miniplm.cli import _stages

    return stage, from_namespace(_stages()[stage][0], args), None


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_entrypoint_is_a_valid_job(path):
    job = yaml.safe_load(path.read_text())
    assert job["kind"] == "RayJob"
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"]
    stage, cfg, _ = stage_config(shlex.split(job["spec"]["entrypoint"]))
    if stage == "train":
        assert cfg.use_gpu and cfg.num_workers >= 1
    else:
        assert cfg.device == "cuda"


def config_paths(cfg) -> list[str]:
    """The values of every `path=True` field of a (nested) config, keywords such as `sample` left out."""
    found = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("path"):
            items = value if isinstance(value, list) else [value]
            found += [v for v in items if v is not None and v not in f.metadata.get("keywords", ())]
        elif dataclasses.is_dataclass(value):
            found += config_paths(value)
        elif isinstance(value, list):
            found += [p for v in value if dataclasses.is_dataclass(v) for p in config_paths(v)]
    return found


def unmounted(argv: list[str], mounts: list[str]) -> list[str]:
    """The local paths a job command names that a node with these mounts lacks. A URL needs
    no mount; a relative path in the config is refused by a submitted job (it would resolve in
    Ray's copy of the working dir); a relative --config file ships with the working dir."""
    _, cfg, config_file = stage_config(argv)

    def mounted(p: str) -> bool:
        return p.startswith("/") and any(p == m or p.startswith(m.rstrip("/") + "/") for m in mounts)

    missing = [p for p in config_paths(cfg) if "://" not in p and not mounted(p)]
    if config_file and not ((REPO / config_file).is_file() or mounted(config_file)):
        missing.append(config_file)
    return missing


def pod_mounts(pod: dict) -> list[str]:
    """Mount paths of the Ray container (KubeRay's first container), each backed by a pod volume."""
    volumes = {v["name"] for v in pod.get("volumes", [])}
    mounts = pod["containers"][0].get("volumeMounts", [])
    assert all(m["name"] in volumes for m in mounts), (mounts, volumes)
    return [m["mountPath"] for m in mounts]


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_local_paths_are_mounted_on_head_and_workers(path):
    """The RayJob's driver runs on the head pod: it reads the model's config, tokenizer and
    fingerprints there before any worker starts, so a path only the workers mount fails."""
    spec = yaml.safe_load(path.read_text())["spec"]
    argv = shlex.split(spec["entrypoint"])
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert unmounted(argv, pod_mounts(head)) == [], "not mounted on the head pod (driver)"
    for group in cluster["workerGroupSpecs"]:
        missing = unmounted(argv, pod_mounts(group["template"]["spec"]))
        assert missing == [], f"not mounted on worker group {group['groupName']}"


def launcher_job_commands(text: str) -> list[list[str]]:
    """The `ray job submit ... -- python jobs/...` commands shown in a YAML's header comment."""
    comment = "\n".join(line.lstrip("#") for line in text.splitlines() if line.startswith("#"))
    commands = []
    for match in re.finditer(r"ray job submit (?:[^\n]*\\\n)*[^\n]*", comment):
        words = shlex.split(match.group(0).replace("\\\n", " "))
        commands.append(words[words.index("--") + 1:])
    return commands


def test_launcher_job_paths_reach_every_node():
    """The cluster launcher copies `file_mounts` to the head and every worker; any other local
    path a job names exists on no node of a fresh cluster."""
    text = (REPO / "cluster" / "ray-cluster.yaml").read_text()
    commands = launcher_job_commands(text)
    assert commands, "ray-cluster.yaml shows no `ray job submit` command"
    mounts = list(yaml.safe_load(text)["file_mounts"] or {})
    for argv in commands:
        assert unmounted(argv, mounts) == [], argv


def base_requirements() -> dict:
    """pyproject.toml's dependencies: name -> Requirement."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {r.name: r for r in map(Requirement, project["dependencies"])}


def runtime_envs() -> dict[str, dict]:
    envs = {"runtime_env.yaml": yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())}
    for path in RAYJOBS:
        envs[path.name] = yaml.safe_load(yaml.safe_load(path.read_text())["spec"]["runtimeEnvYAML"])
    return envs


@pytest.mark.parametrize("name", sorted(runtime_envs()))
def test_runtime_env_installs_miniplm_dependencies_with_its_floors(name):
    """The job ships miniplm's source, not its package: the runtime env must install what
    pyproject.toml requires (the Ray image brings Ray, not torch), with the same floors."""
    from packaging.requirements import Requirement

    wanted = {n: str(r.specifier) for n, r in base_requirements().items() if n != "ray"}
    pip = {r.name: str(r.specifier) for r in map(Requirement, runtime_envs()[name]["pip"])}
    assert {n: pip.get(n) for n in wanted} == wanted


@pytest.mark.parametrize("path", [p for p in MANIFESTS if p.name.startswith(("raycluster", "rayjob"))],
                         ids=lambda p: p.name)
def test_kuberay_ray_version_meets_the_floor(path):
    """The image's Ray is the one jobs get (a runtime env does not reinstall Ray)."""
    ray = base_requirements()["ray"]
    spec = yaml.safe_load(path.read_text())["spec"]
    versions = set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", path.read_text()))
    versions |= {spec.get("rayVersion") or spec["rayClusterSpec"]["rayVersion"]}
    assert all(ray.specifier.contains(v) for v in versions), (versions, ray)


@pytest.mark.parametrize("path", [p for p in MANIFESTS if p.name.startswith("ray") and
                                  yaml.safe_load(p.read_text()).get("kind") in ("RayCluster", "RayJob")],
                         ids=lambda p: p.name)
def test_kuberay_clusters_run_with_token_authentication(path):
    """As Ray ships it: every KubeRay cluster here has token auth on (the operator creates the
    token and hands it to every Ray container), and the README says how a client gets it."""
    doc = yaml.safe_load(path.read_text())
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    assert spec.get("authOptions", {}).get("mode") == "token", path.name
    readme = (REPO / "cluster" / "README.md").read_text()
    name = doc["metadata"]["name"]
    if doc["kind"] == "RayCluster":
        assert f"kubectl get secret {name} " in readme and f"svc/{name}-head-svc" in readme
