"""Object storage: every stage reads and writes s3:// URLs and gives the same results as on
local disk (there through relative paths, as users type them). The S3 API is real (moto's
server on a loopback port, s3fs as the client); the S3 run goes through the CLI in its own
process, the way a user runs it, with credentials and an endpoint in its environment and in
that of the Ray cluster it runs on."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import fsspec
import pyarrow.parquet as pq
import pytest
from conftest import run_cli_sessions, save_tiny_model, write_jsonl
from safetensors.torch import load_file

from miniplm import io

BUCKET = "miniplm"


@pytest.fixture(scope="module")
def s3(s3_server, ray_session):
    """An S3 client of the session's S3 API with a bucket: (s3fs filesystem, environment
    of a client process that runs stages on the session's Ray, whose nodes can reach S3)."""
    import ray
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server["AWS_ENDPOINT_URL"], key="testing", secret="testing")
    fs.mkdir(BUCKET)
    return fs, dict(os.environ, **s3_server, RAY_ADDRESS=ray.get_runtime_context().gcs_address)


def read_parts(fs, root) -> list:
    """A stage folder's parts in manifest order, through `fs` (local disk or the S3 client)."""
    with fs.open(f"{root}/{io.MANIFEST}") as f:
        manifest = json.load(f)
    tables = []
    for part in manifest["parts"]:
        with fs.open(f"{root}/{part['name']}", "rb") as f:
            tables.append(pq.read_table(f))
    return tables


def read_losses(fs, run) -> list[float]:
    with fs.open(f"{run}/metrics.jsonl") as f:
        return [json.loads(line)["loss"] for line in f]


TRAIN = ["model.preset=tiny", "data.seq_len=64", "micro_batch=4", "batch_tokens=256", "steps=4",
         "checkpoint_every=2", "optim.warmup_steps=2", "cpus_per_worker=1", "eval.max_sequences=4"]


def stage_commands(raw, tokenizer, models, work, run) -> list[list[str]]:
    """prepare -> score (teacher, reference) -> select -> train as `miniplm` commands, every
    location a path (or URL) prefix the caller chooses."""
    sets = [f"output={run}", f"data.path={work}/refined", f"model.tokenizer={tokenizer}",
            f"eval.data={work}/inst", *TRAIN]
    return [["prepare", raw, "--output", f"{work}/inst", "--max-chars", "800", "--rows-per-part", "25"],
            *[["score", "--instances", f"{work}/inst", "--model", f"{models}/{name}", "--output",
               f"{work}/scores/{name}", "--cpus-per-worker", "0.5", "--batch-tokens", "2048"]
              for name in ("teacher", "reference")],
            ["select", "--instances", f"{work}/inst", "--teacher", f"{work}/scores/teacher", "--reference",
             f"{work}/scores/reference", "--output", f"{work}/refined", "--alpha", "0.5"],
            ["train", *[a for s in sets for a in ("--set", s)]]]


@pytest.mark.timeout(900)
def test_stage_chain_on_s3_equals_relative_paths_on_local_disk(s3, documents, tokenizer_dir, llama_dir,
                                                                tmp_path, ray_session):
    """The stages as `miniplm` commands twice: on local disk from a fresh working directory,
    every path relative (resolved at the command line, before any Ray worker, which runs in
    another directory, can see them: before that, train's workers did not find their token
    cache), and on s3://, every path a URL. Both give the same data, curve and weights."""
    import ray

    fs, env = s3
    url = f"s3://{BUCKET}"
    cwd = tmp_path / "project"
    write_jsonl(cwd / "raw" / "docs_a.jsonl", [{"text": d} for d in documents[0:60]])
    write_jsonl(cwd / "raw" / "docs_b.jsonl", [{"text": d} for d in documents[60:120]])
    shutil.copytree(tokenizer_dir, cwd / "tokenizer")
    shutil.copytree(llama_dir, cwd / "ckpt" / "teacher")
    save_tiny_model("llama", tokenizer_dir, cwd / "ckpt" / "reference", hidden=32, seed=1)
    for local, remote in [("raw", "raw"), ("tokenizer", "tokenizer"), ("ckpt", "ckpt")]:
        fs.put(f"{cwd / local}/", f"{BUCKET}/{remote}/", recursive=True)

    run_cli_sessions(
        # local disk, relative paths, this session's Ray
        (dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address),
         stage_commands("raw", "tokenizer", "ckpt", "work", "runs/student"), cwd),
        # s3://, through a client with credentials and an endpoint in its environment, on the
        # same Ray at the same time: the two overlap their start-ups and S3 round trips
        (env, stage_commands(f"{url}/raw", f"{url}/tokenizer", f"{url}/ckpt", url, f"{url}/run"), None))

    work, run = cwd / "work", cwd / "runs" / "student"
    disk = fsspec.filesystem("file")
    local = {stage: read_parts(disk, work / stage)
             for stage in ("inst", "scores/teacher", "scores/reference", "refined")}
    kept, instances = (sum(t.num_rows for t in local[stage]) for stage in ("refined", "inst"))
    assert kept == instances // 2
    for stage in ("inst", "scores/teacher", "refined"):  # every manifest names absolute paths
        assert '"work/' not in (work / stage / io.MANIFEST).read_text(), stage
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "eval_loss" in rows[-1]

    # identical instances, score tables, refined corpus, loss curve and final weights
    for stage, ours in local.items():
        theirs = read_parts(fs, f"{BUCKET}/{stage}")
        assert len(ours) == len(theirs) > 0, stage
        assert all(a.equals(b) for a, b in zip(ours, theirs)), stage  # data, not provenance metadata
    s3_losses = read_losses(fs, f"{BUCKET}/run")
    assert s3_losses == pytest.approx([r["loss"] for r in rows], rel=1e-5)
    assert fs.exists(f"{BUCKET}/run/ray") and fs.glob(f"{BUCKET}/run/ray/step-*")  # checkpoints on s3
    cache = env["MINIPLM_CACHE"]  # remote checkpoints were downloaded once, into the cache
    assert {p.parent.name for p in pathlib.Path(cache).glob("remote/*/*/config.json")} == \
        {"teacher", "reference"}
    assert not os.path.exists("s3:")  # no URL was mistaken for a local path
    fs.get(f"{BUCKET}/run/final/", str(tmp_path / "s3_final") + "/", recursive=True)
    ours = load_file(run / "final" / "model.safetensors")
    theirs = load_file(tmp_path / "s3_final" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert (ours[k] - theirs[k]).abs().max() < 1e-4, k


def test_remote_checkpoints_download_once_and_again_when_changed(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIPLM_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")  # a non-local fsspec filesystem, like s3:// to our code
    fs.pipe("/ckpt/config.json", b'{"v": 1}')
    fs.pipe("/ckpt/shards/model.bin", b"weights")

    folder = io.local_copy("memory://ckpt")
    assert (pathlib.Path(folder) / "shards" / "model.bin").read_bytes() == b"weights"
    assert io.local_copy("memory://ckpt") == folder  # cached: not downloaded again
    single = io.local_copy("memory://ckpt/config.json")
    assert pathlib.Path(single).read_bytes() == b'{"v": 1}'

    fs.pipe("/ckpt/shards/model.bin", b"new weights")  # rewritten in place: a new size
    changed = io.local_copy("memory://ckpt")
    assert changed != folder and (pathlib.Path(changed) / "shards" / "model.bin").read_bytes() == b"new weights"


def test_a_download_leaves_no_partial_folder_behind(tmp_path, monkeypatch):
    """A download that fails midway removes its staging folder; one a killed process left a day
    ago is cleared by the next download of the same files, and a live one (recent) is kept."""
    import glob
    import time

    monkeypatch.setenv("MINIPLM_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    fs.pipe("/dl/config.json", b'{"v": 1}')
    fs.pipe("/dl/model.bin", b"weights")
    get = type(fs).get

    def fails_after_one_file(self, sources, dests, **kw):
        get(self, sources[:1], dests[:1], **kw)
        raise OSError(104, "Connection reset by peer")

    with monkeypatch.context() as m:
        m.setattr(type(fs), "get", fails_after_one_file)
        with pytest.raises(OSError, match="Connection reset"):
            io.local_copy("memory://dl")
    partials = str(tmp_path / "cache" / "remote" / "*.partial")
    assert glob.glob(partials) == []

    folder = io.local_copy("memory://dl")  # learn where its staging folders go
    shutil.rmtree(folder)
    killed, live = f"{pathlib.Path(folder).parent}.dead.partial", f"{pathlib.Path(folder).parent}.live.partial"
    for staging in (killed, live):
        os.makedirs(staging)
    day_ago = time.time() - 25 * 3600
    os.utime(killed, (day_ago, day_ago))
    os.rmdir(pathlib.Path(folder).parent)
    io.local_copy("memory://dl")
    assert sorted(glob.glob(partials)) == [live]
