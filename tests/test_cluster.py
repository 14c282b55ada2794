"""cluster/: the launcher YAML passes Ray's config schema and the KubeRay manifests pass their
CRDs' schemas (vendored in tests/data/kuberay/) with one Ray version that pyproject.toml allows;
every RayJob entrypoint names a job in jobs/ with arguments its parser and config accept, and
every local path a job names is mounted where the job runs: on the head, whose driver opens the
model config, tokenizer and fingerprints, and on the workers."""

from __future__ import annotations

import dataclasses
import functools
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
    """(stage, its resolved config, the --config file or None) for `python jobs/job_<stage>.py ...`."""
    python, script, *args = argv
    assert python == "python" and (REPO / script).is_file(), argv
    stage = pathlib.Path(script).stem.removeprefix("job_")
    args = build_parser().parse_args([stage, *args])
    if stage == "train":
        from miniplm.training.train import TrainConfig

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


# --- Schema validation: what a cluster accepts, not only what parses ------------------------
# The KubeRay CRDs' openAPIV3Schema, vendored in tests/data/kuberay/ (see its README for the
# release), checked the way `kubectl apply --validate=strict` and the API server check them.

KUBERAY = REPO / "tests" / "data" / "kuberay"
CRD_SCHEMAS = {("ray.io/v1", "RayCluster"): "ray.io_rayclusters.v1.json",
               ("ray.io/v1", "RayJob"): "ray.io_rayjobs.v1.json"}
KUBERAY_DOCS = [(p, i) for p in MANIFESTS for i, d in enumerate(yaml.safe_load_all(p.read_text()))
                if isinstance(d, dict) and str(d.get("apiVersion", "")).startswith("ray.io/")]
# The keywords the vendored schemas use. A new KubeRay release that brings another one fails
# test_vendored_schemas_use_only_handled_keywords until `strict` below learns what it means.
HANDLED = {"type", "properties", "additionalProperties", "items", "required", "enum", "format",
           "pattern", "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
           "anyOf", "default", "nullable", "x-kubernetes-int-or-string", "x-kubernetes-list-type",
           "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "x-kubernetes-validations",
           "x-kubernetes-preserve-unknown-fields"}


def object_meta(kind: str) -> dict:
    """The root `metadata` (the CRD leaves it to the API server's ObjectMeta): the fields a
    manifest sets, with KubeRay's name rule (ray-operator/controllers/ray/utils/validation.go:
    a DNS-1035 label of at most 53 characters for a RayCluster, 47 for a RayJob, which adds a
    suffix to name its cluster). Server-set fields (uid, resourceVersion, ...) are refused."""
    strings = {"type": "object", "additionalProperties": {"type": "string"}}
    return {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
        "name": {"type": "string", "pattern": r"^[a-z]([-a-z0-9]*[a-z0-9])?$",
                 "maxLength": {"RayCluster": 53, "RayJob": 47}[kind]},
        "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "labels": strings, "annotations": strings,
        "finalizers": {"type": "array", "items": {"type": "string"}}}}


def strict(schema: dict) -> dict:
    """An OpenAPI v3 structural schema as JSON Schema (Draft 7), with the API server's reading:
    an object that lists its fields (or none) and does not say x-kubernetes-preserve-unknown-fields
    takes no other field (the server would drop it silently; strict validation refuses it), and
    null is allowed only where `nullable: true` says so (stricter than the server, which prunes
    such nulls: a null in a manifest is an empty key left by mistake)."""
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {name: strict(sub) for name, sub in s["properties"].items()}
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strict(s["additionalProperties"])
    if "items" in s:
        s["items"] = strict(s["items"])
    if "anyOf" in s:
        s["anyOf"] = [strict(sub) for sub in s["anyOf"]]
    if (s.get("type") == "object" and "additionalProperties" not in s
            and not s.get("x-kubernetes-preserve-unknown-fields")):
        s["additionalProperties"] = False
    if s.pop("nullable", False):
        s = {"type": [s["type"], "null"], **{k: v for k, v in s.items() if k != "type"}} \
            if "type" in s else {"anyOf": [s, {"type": "null"}]}
    return s


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: a `set` holds no item twice; a `map` no two items with the same
    x-kubernetes-list-map-keys (a key left out counts as its default, e.g. a port's TCP)."""
    import json

    from jsonschema import ValidationError

    if list_type not in ("set", "map") or not validator.is_type(instance, "array"):
        return
    fields = schema.get("items", {}).get("properties", {})
    seen = set()
    for item in instance:
        if list_type == "set":
            key = json.dumps(item, sort_keys=True)
        elif isinstance(item, dict):
            key = tuple((k, item.get(k, fields.get(k, {}).get("default")))
                        for k in schema.get("x-kubernetes-list-map-keys", []))
        else:
            continue  # the items' own schema reports a non-object
        if key in seen:
            yield ValidationError(f"duplicate entry {key} in a list of type {list_type}")
        seen.add(key)


def _cel(validator, rules, instance, schema):
    """x-kubernetes-validations are CEL rules, which no Python validator here evaluates. A rule
    on `oldSelf` constrains updates only; any other rule on a field a manifest sets fails, so a
    manifest cannot rely on a rule this test does not check (check it by hand, then teach it)."""
    from jsonschema import ValidationError

    for rule in rules:
        if "oldSelf" not in rule["rule"]:
            yield ValidationError(f"sets a field with a CEL rule this test cannot check: {rule['rule']}")


@functools.cache
def crd_validator(api_version: str, kind: str):
    import json

    from jsonschema import Draft7Validator, FormatChecker, validators

    schema = strict(json.loads((KUBERAY / CRD_SCHEMAS[api_version, kind]).read_text()))
    schema["properties"]["metadata"] = object_meta(kind)
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    # OpenAPI's integer formats, as the API server checks them (date-time is only in `status`)
    formats = FormatChecker(formats=())
    formats.checks("int32")(lambda v: not isinstance(v, int) or -2**31 <= v < 2**31)
    formats.checks("int64")(lambda v: not isinstance(v, int) or -2**63 <= v < 2**63)
    cls = validators.extend(Draft7Validator, {"x-kubernetes-list-type": _list_type,
                                              "x-kubernetes-validations": _cel})
    return cls(schema, format_checker=formats)


def schema_errors(doc: dict) -> list[str]:
    """'<field path>: <what is wrong>' for each way a KubeRay manifest breaks its CRD schema."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in CRD_SCHEMAS:
        return [f"apiVersion/kind {key}: no vendored CRD schema (have {sorted(CRD_SCHEMAS)})"]
    errors = []
    for error in crd_validator(*key).iter_errors(doc):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        errors.append(f"{path.lstrip('.') or '<root>'}: {error.message}")
    return sorted(errors)


def test_vendored_schemas_use_only_handled_keywords():
    import json

    def keywords(schema: dict) -> set[str]:
        found = set(schema)
        subs = [*schema.get("properties", {}).values(), *schema.get("anyOf", []),
                *(s for s in (schema.get("items"), schema.get("additionalProperties"))
                  if isinstance(s, dict))]
        return found.union(*map(keywords, subs))

    for name in CRD_SCHEMAS.values():
        assert keywords(json.loads((KUBERAY / name).read_text())) <= HANDLED, name


@pytest.mark.parametrize("path,index", KUBERAY_DOCS, ids=[f"{p.name}#{i}" for p, i in KUBERAY_DOCS])
def test_kuberay_manifest_passes_its_crd_schema(path, index):
    names = {p.name for p, _ in KUBERAY_DOCS}
    assert names >= {"raycluster.yaml", "rayjob-score.yaml", "rayjob-train.yaml"}
    doc = list(yaml.safe_load_all(path.read_text()))[index]
    assert schema_errors(doc) == []


def test_crd_schema_refuses_what_a_cluster_would_drop_or_reject():
    """A misspelled field fails, naming its path (a real cluster would drop it silently), as do
    a wrong type, a value outside an enum, a duplicate container port and a name KubeRay refuses."""
    import copy

    job = yaml.safe_load((REPO / "cluster" / "rayjob-score.yaml").read_text())
    assert schema_errors(job) == []
    cases = [
        (lambda d: d["spec"]["rayClusterSpec"].__setitem__("rayVerison", "2.60.0"),
         "spec.rayClusterSpec: Additional properties are not allowed ('rayVerison' was unexpected)"),
        (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
         .__setitem__("resource", {}),
         "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0]: "
         "Additional properties are not allowed ('resource' was unexpected)"),
        (lambda d: d["spec"].__setitem__("shutdownAfterJobFinishes", "yes"),
         "spec.shutdownAfterJobFinishes: 'yes' is not of type 'boolean'"),
        (lambda d: d["spec"]["rayClusterSpec"]["authOptions"].__setitem__("mode", "Token"),
         "spec.rayClusterSpec.authOptions.mode: 'Token' is not one of"),
        (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
         .__setitem__("ports", [{"containerPort": 8080}, {"containerPort": 8080, "protocol": "TCP"}]),
         "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].ports: duplicate entry"),
        (lambda d: d["metadata"].__setitem__("name", "miniplm_score"),
         "metadata.name: 'miniplm_score' does not match"),
        (lambda d: d.__setitem__("kind", "RayJobs"), "apiVersion/kind ('ray.io/v1', 'RayJobs')"),
    ]
    for change, expected in cases:
        bad = copy.deepcopy(job)
        change(bad)
        errors = schema_errors(bad)
        assert any(e.startswith(expected) for e in errors), (expected, errors)


def test_kuberay_pins_one_ray_version_that_pyproject_allows():
    """The image's Ray is the one jobs get (a runtime env does not reinstall Ray): every Ray
    container runs a rayproject/ray image tagged with one release, `rayVersion` (which KubeRay
    uses to configure the cluster) names the same, and pyproject.toml's ray requirement allows it."""
    def images(node) -> list[str]:
        """Every `image:` under node: Ray containers, init containers, sidecars."""
        if isinstance(node, list):
            return [i for v in node for i in images(v)]
        if not isinstance(node, dict):
            return []
        return [v for k, v in node.items() if k == "image"] + images(list(node.values()))

    versions = {}
    for path, index in KUBERAY_DOCS:
        doc = list(yaml.safe_load_all(path.read_text()))[index]
        cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        versions[f"{path.name}: rayVersion"] = cluster["rayVersion"]
        for image in images(cluster):
            tag = re.fullmatch(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)(?:-[\w.-]+)?", image)
            assert tag, f"{path.name}: {image} is not a rayproject/ray image pinned to a release"
            versions[f"{path.name}: {image}"] = tag.group(1)
    assert len(set(versions.values())) == 1, versions
    ray = base_requirements()["ray"]
    assert ray.specifier.contains(next(iter(versions.values()))), (versions, str(ray))


def test_launcher_config_passes_rays_schema():
    """`ray up` checks its config against the ray-schema.json that the installed Ray ships."""
    import json

    import jsonschema
    import ray.autoscaler

    schema = json.loads((pathlib.Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    config["node_types"] = config.pop("available_node_types")  # an unknown key is refused
    with pytest.raises(jsonschema.ValidationError, match="node_types"):
        jsonschema.validate(config, schema)
