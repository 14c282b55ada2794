"""Models and tokenizers named as Hugging Face users name them (`org/name[@revision]`), resolved
through a real Hugging Face cache on disk (the `models--org--name/{blobs,refs,snapshots}` layout
huggingface_hub writes), offline, in processes started as a user starts `miniplm`."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import run_cli_sessions

from miniplm import io

REPO = "miniplm-test/tiny-llama"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_hub_cache(hf_home: pathlib.Path, repo: str, checkpoint: pathlib.Path, commit_seed: str) -> str:
    """`checkpoint`'s files as commit `commit` of `repo` in the Hugging Face cache under
    `hf_home`, laid out as huggingface_hub lays out a download: content-named blobs, one
    snapshot folder of relative links per commit, and `refs/main` naming the commit."""
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(commit_seed.encode()).hexdigest()
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(checkpoint.iterdir()):
        data = file.read_bytes()
        # large files are LFS objects, named by sha256; the rest by git's blob id
        blob = hashlib.sha256(data).hexdigest() if file.suffix == ".safetensors" else git_blob_id(data)
        (root / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.join("..", "..", "blobs", blob))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory, llama_dir):
    home = tmp_path_factory.mktemp("hf_home")
    return home, write_hub_cache(home, REPO, llama_dir, "first")


def hub_env(home, **extra) -> dict:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("HF_")},
            "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", **extra}


def read_table(root):
    manifest = io.read_json(str(root / io.MANIFEST))
    return pq.read_table([str(root / p["name"]) for p in manifest["parts"]]).sort_by("id")


@pytest.mark.timeout(300)
def test_score_by_hub_id_equals_score_by_path(hub_home, instances, llama_scores, tmp_path, ray_session):
    import ray

    home, commit = hub_home
    out = tmp_path / "scores"
    env = hub_env(home, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    run_cli_sessions((env, [["score", "--instances", str(instances), "--model", REPO, "--output", str(out),
                             "--cpus-per-worker", "0.5", "--batch-tokens", "2048"]], tmp_path))
    assert read_table(out).equals(read_table(llama_scores[1]))  # row for row the same table
    provenance = io.read_json(str(out / io.MANIFEST))["provenance"]
    snapshot = home / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit
    assert provenance["model"] == str(snapshot)
    assert provenance["model_hub"] == {"id": REPO, "commit": commit}
    # the fingerprint is keyed on the commit's content-named blobs, not on reading the weights
    def link(name):
        return f"{name}:{os.path.basename(os.readlink(snapshot / name))}"

    weights = sorted(p.name for p in snapshot.iterdir() if p.suffix == ".safetensors")
    assert provenance["model_fingerprint"] == io.hash_json(["hub-blobs", [link("config.json"), *map(link, weights)]])


RESOLVE = """
import json, sys
from miniplm.config import load
from miniplm.pipeline.run import DEMO_CONFIG, load_pipeline
from miniplm.training.train import TrainConfig

repo, out = sys.argv[1], sys.argv[2]
train = load(TrainConfig, None, [f"output={out}/run", f"data.path={out}/data", f"model.tokenizer={repo}",
                                 "steps=1", f"kd.teacher={repo}"])
run = load_pipeline(DEMO_CONFIG, [f"output={out}/demo", f"teacher.checkpoint={repo}", f"tokenizer={repo}"])
print(json.dumps({"tokenizer": train.model.tokenizer, "kd.teacher": train.kd.teacher,
                  "teacher.checkpoint": run.teacher.checkpoint, "pipeline.tokenizer": run.tokenizer}))
"""


def test_a_hub_id_names_a_tokenizer_a_kd_teacher_and_a_pipeline_teacher(hub_home, tmp_path):
    home, commit = hub_home
    done = subprocess.run([sys.executable, "-c", RESOLVE, f"{REPO}@{commit}", str(tmp_path)],
                          env=hub_env(home), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    snapshot = str(home / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit)
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "tokenizer": snapshot, "kd.teacher": snapshot, "teacher.checkpoint": snapshot, "pipeline.tokenizer": snapshot}


def test_a_moved_main_branch_is_a_new_commit(hub_home, llama_dir, tmp_path):
    """`refs/main` moved to a new commit: the id now resolves there (and its fingerprint
    follows its blobs), while `@<old commit>` still names the old snapshot."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(hub_home[0], home, symlinks=True)
    old = hub_home[1]
    new = write_hub_cache(home, REPO, llama_dir, "second")
    code = ("import sys; from miniplm import hub; print(hub.resolve(sys.argv[1])); print(hub.resolve(sys.argv[2]))")
    done = subprocess.run([sys.executable, "-c", code, REPO, f"{REPO}@{old}"], env=hub_env(home),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    latest, pinned = done.stdout.split()
    assert latest.endswith(f"/snapshots/{new}") and pinned.endswith(f"/snapshots/{old}")


def test_a_missing_hub_id_fails_before_ray_starts_naming_it(hub_home, tmp_path):
    home, _ = hub_home
    env = {k: v for k, v in hub_env(home).items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "miniplm.cli", "score", "--instances", str(tmp_path / "i"),
                           "--model", "miniplm-test/no-such-model", "--output", str(tmp_path / "s")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "model: miniplm-test/no-such-model: no such local folder, and as a Hugging Face Hub id it cannot " \
           "be resolved" in done.stderr
    assert "Started a local Ray instance" not in done.stderr + done.stdout and not (tmp_path / "s").exists()


def test_a_local_folder_wins_over_a_hub_id(hub_home, llama_dir, tmp_path):
    """`org/name` that exists as a folder here is that folder, as transformers does."""
    import shutil

    home, _ = hub_home
    shutil.copytree(llama_dir, tmp_path / REPO)
    code = "import sys; from miniplm.config import resolve_hub_ids; from miniplm.scoring.score import ScoreConfig; " \
           "print(resolve_hub_ids(ScoreConfig, {'model': sys.argv[1]})['model'])"
    done = subprocess.run([sys.executable, "-c", code, REPO], env=hub_env(home), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == REPO, done.stderr[-2000:]
