"""Several Ray nodes on one machine, nodes that die, work that cannot run (issue 32).

One cluster for the module, built with `ray.cluster_utils.Cluster` as Ray's own fault-tolerance
tests build theirs, with token authentication on: a head with no CPUs for work and two worker
nodes of 2 CPUs, each a raylet of its own. The stages run as a user runs them against it, as
`python -m miniplm.cli <stage> --address <cluster>` processes; a node is killed with
`remove_node(node, allow_graceful=False)` and every process it had (raylet, agents, workers),
as a lost machine takes them, and a replacement joins as an autoscaler would bring one.

Nothing here starts Ray in the pytest process: the cluster lives in a controller process
(`CONTROLLER`) driven over its stdin, with a Ray temp dir of its own, so the session's in-process
Ray (`ray_session`) and the machine's /tmp/ray (address file included) are left alone.

Run alone: `pytest -m multinode` (or this file).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import free_port, run_cli_sessions, save_tiny_model, write_jsonl

from miniplm import io

pytestmark = pytest.mark.multinode

# The cluster's controller: starts the head and the worker nodes, then adds, kills and lists
# nodes on request (one JSON line in, one `@@`-prefixed JSON line out), and takes everything
# down on "stop" or when its stdin closes (the test process gone).
CONTROLLER = r"""
import json, os, sys
import psutil
from ray.cluster_utils import Cluster

def reply(**obj):
    print("@@" + json.dumps(obj), flush=True)

def tree(pid):
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return []

def kill(procs):
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=30)

def raylet(node):
    return node.all_processes["raylet"][0].process.pid

def title(p):
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # exited while we looked
        return ""

head_args, worker_cpus = json.loads(sys.argv[1]), json.loads(sys.argv[2])
cluster = Cluster(initialize_head=True, head_node_args=head_args)
workers = {}

def add(cpus):
    node = cluster.add_node(num_cpus=cpus)
    cluster.wait_for_nodes()
    workers[node.node_id] = (node, cpus)
    return node.node_id

def remove(node_id, answer=True):
    node, _ = workers.pop(node_id)
    doomed = tree(raylet(node))  # the raylet, its agents and workers, killed at once as a lost
    for p in doomed:             # machine takes them
        try:
            p.kill()
        except psutil.Error:
            pass
    if answer:
        reply(removed=node_id)
    cluster.remove_node(node, allow_graceful=False)  # the cluster's bookkeeping: nothing left to kill
    psutil.wait_procs(doomed, timeout=30)

for cpus in worker_cpus:
    add(cpus)
reply(address=cluster.address, head=cluster.head_node.node_id)
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "stop":
            break
        if cmd["op"] == "add":
            reply(node=add(cmd["cpus"]))
        elif cmd["op"] == "remove":
            remove(cmd["node"])
        elif cmd["op"] == "workers":  # {node id: CPUs}
            reply(workers={n: c for n, (_, c) in workers.items()})
        elif cmd["op"] == "alive":  # every node the cluster counts as alive, its own or not
            reply(nodes=[n["NodeID"] for n in cluster.global_state.node_table() if n["Alive"]])
        elif cmd["op"] == "kill_head":  # the head lost: GCS, its raylet, everything it ran
            doomed = tree(raylet(cluster.head_node))
            cluster.remove_node(cluster.head_node, allow_graceful=False)
            kill(doomed)
            reply(killed=True)
        elif cmd["op"] == "hosting":  # the worker nodes running a process whose title has `title`
            hosts = [n for n, (node, _) in workers.items()
                     if any(cmd["title"] in title(p) for p in tree(raylet(node))[1:])]
            reply(nodes=hosts)
    except Exception as err:  # noqa: BLE001 (reported to the test)
        reply(error=repr(err))
everything = tree(os.getpid())[1:]  # whatever outlives its node's removal is killed too
for node_id in list(workers):
    remove(node_id, answer=False)
if cluster.head_node is not None:
    cluster.remove_node(cluster.head_node, allow_graceful=False)
kill(everything)
reply(stopped=True)
"""


class RayCluster:
    """A controller process holding a `Cluster`; its address, and the environment a client of it
    needs (token auth on, the token, the cluster's own Ray temp dir). Returns at once: the
    cluster comes up while the caller goes on (`address` waits for it)."""

    def __init__(self, worker_cpus: list[int]):
        self.temp = tempfile.mkdtemp(prefix="mn", dir="/tmp")  # short: Ray's socket paths have a limit
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        self.env.update(RAY_TMPDIR=self.temp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                        RAY_USAGE_STATS_ENABLED="0",
                        # an actor pool starts work once all its actors are up: else the first
                        # scoring actor could take every part while the other still loads the model
                        RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S="300")
        head = {"num_cpus": 0, "include_dashboard": False, "dashboard_port": free_port(),
                "dashboard_agent_listen_port": free_port(),
                # a killed node is declared dead after 5 missed health checks of 1 s, not Ray's
                # default of 5 of 3 s: the same failure, handled the same way, seen sooner
                "_system_config": {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                                   "health_check_failure_threshold": 5}}
        self.log = open(os.path.join(self.temp, "controller.log"), "w+")
        self.proc = subprocess.Popen([sys.executable, "-c", CONTROLLER, json.dumps(head), json.dumps(worker_cpus)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     env=self.env, text=True, start_new_session=True)
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    @functools.cached_property
    def address(self) -> str:
        """The head's GCS address, once the cluster is up (it starts while the caller goes on)."""
        return self._reply(timeout=240)["address"]

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                self.replies.put(json.loads(line[2:]))
        self.replies.put({"error": "the cluster's controller exited"})

    def _reply(self, timeout: float) -> dict:
        try:
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no answer from the cluster's controller in {timeout} s: {self.tail()}") from None
        if "error" in reply:
            raise RuntimeError(f"cluster controller: {reply['error']}: {self.tail()}")
        return reply

    def call(self, timeout: float = 120, **cmd) -> dict:
        assert self.address  # up
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout)

    def tail(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-3000:]

    def workers(self) -> dict[str, int]:
        return self.call(op="workers")["workers"]

    def add(self, cpus: int) -> str:
        return self.call(op="add", cpus=cpus)["node"]

    def remove(self, node: str) -> None:
        self.call(op="remove", node=node)

    def alive(self) -> list[str]:
        return self.call(op="alive")["nodes"]

    def hosting(self, title: str) -> list[str]:
        return self.call(op="hosting", title=title)["nodes"]

    def shape(self, cpus: list[int]) -> None:
        """Worker nodes of exactly these CPU counts (nodes of other sizes removed, missing ones added)."""
        want = sorted(cpus)
        have = self.workers()
        for node, n in sorted(have.items()):
            if n in want:
                want.remove(n)
            else:
                self.remove(node)
        for n in want:
            self.add(n)

    def stop(self) -> None:
        import psutil

        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            procs = []
        try:
            self.call(op="stop", timeout=120)
        except (OSError, RuntimeError, TimeoutError):
            pass
        finally:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            for p in [psutil.Process(self.proc.pid), *procs] if self.proc.poll() is None else procs:
                try:  # whatever is still up: the controller hung, or a process outlived its node
                    p.kill()
                except psutil.Error:
                    pass
            self.proc.wait(timeout=30)
            self.log.close()
            shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = RayCluster([2, 2])
    try:
        yield c
    finally:
        c.stop()


# ---------------------------------------------------------------- running stages as a user does


def miniplm(env: dict, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "miniplm.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def start(env: dict, log: pathlib.Path, *args: str) -> subprocess.Popen:
    """`miniplm <args>` in the background, its output to `log` (no pipe to fill)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "miniplm.cli", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: pathlib.Path, timeout: float = 240) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"miniplm did not finish in {timeout} s: {log.read_text()[-3000:]}")
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def wait_for(what: str, condition, proc: subprocess.Popen, log: pathlib.Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"miniplm ended before {what}: {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"no {what} in {timeout} s: {log.read_text()[-3000:]}")
        time.sleep(0.02)


def read_table(root: pathlib.Path) -> pa.Table:
    manifest = io.read_json(str(root / io.MANIFEST))
    return pa.concat_tables(pq.read_table(root / p["name"]) for p in manifest["parts"])


# ---------------------------------------------------------------- data and reference runs

# the scoring runs: two actors of 1.5 CPUs cannot share a 2-CPU node, so each worker node holds
# one; the half CPU left on each is for the tasks that read and tokenise the parts
SCORE = ["--workers", "2", "--cpus-per-worker", "1.5", "--batch-tokens", "1024"]
# the reference: one actor of the same size (and so the same torch threads) on a 2-CPU local Ray
SCORE_ALONE = ["--workers", "1", "--cpus-per-worker", "1.5", "--batch-tokens", "1024"]


def train_args(data, out) -> list[str]:
    """`miniplm train` of the tiny preset on two DDP workers: 2 x 4 sequences of 64 tokens per step,
    a checkpoint every 20 of 100 steps; half a CPU per worker, so the two fit a 2-CPU local Ray
    with room for the data (torch runs one thread per worker either way)."""
    sets = [f"output={out}", f"data.path={data['instances']}", f"model.tokenizer={data['tokenizer']}",
            "model.preset=tiny", "data.seq_len=64", "micro_batch=4", "batch_tokens=512", "num_workers=2",
            "cpus_per_worker=0.5", "steps=100", "checkpoint_every=20", "keep_checkpoints=2",
            "optim.lr=3e-3", "optim.warmup_steps=5"]
    return ["train", *(arg for s in sets for arg in ("--set", s))]


@pytest.fixture(scope="module")
def data(cluster, documents, tokenizer_dir, tmp_path_factory):
    """Instances in many small parts, a tiny Llama, and the single-node runs that the cluster's
    must equal, from one fresh local Ray (`--address local`): the score table, and a training
    run (its token cache, final weights and metrics)."""
    root = tmp_path_factory.mktemp("multinode")
    write_jsonl(root / "raw" / "docs.jsonl", [{"text": d} for d in documents[:150]])
    data = {"root": root, "instances": root / "inst", "tokenizer": tokenizer_dir, "alone": root / "alone",
            "model": save_tiny_model("llama", tokenizer_dir, root / "llama"), "train_alone": root / "train_alone"}
    local = ["--address", "local"]
    run_cli_sessions((cluster.env, [  # (the local Ray's files go to the cluster's temp dir too)
        ["prepare", str(root / "raw"), "--output", str(data["instances"]), "--max-chars", "1000",
         "--rows-per-part", "6", *local],
        [*score_args(data, data["alone"]), *SCORE_ALONE, *local],
        [*train_args(data, data["train_alone"]), *local]], None))
    return data


def score_args(data, out) -> list[str]:
    return ["score", "--instances", str(data["instances"]), "--model", str(data["model"]), "--output", str(out)]


def assert_every_instance_once(table: pa.Table, data) -> None:
    ids = table["id"].to_pylist()
    expected = io.read_json(str(data["instances"] / io.MANIFEST))["instances"]
    assert len(ids) == len(set(ids)) == expected


# ---------------------------------------------------------------- 1. work spread over nodes


@pytest.mark.timeout(300)
def test_score_spread_over_nodes_equals_a_single_node_run(cluster, data, tmp_path):
    """`score --workers 2` on the cluster: each worker node's actor scored parts (each part names
    the node that scored it, in its file and in the manifest), and the table is the single-node
    run's, row for row."""
    cluster.shape([2, 2])
    out = tmp_path / "scores"
    ok(miniplm(cluster.env, *score_args(data, out), *SCORE, "--address", cluster.address))
    manifest = io.read_json(str(out / io.MANIFEST))
    table = read_table(out)
    assert table.equals(read_table(data["alone"]))
    assert_every_instance_once(table, data)
    by_node = {p["name"]: p["node"] for p in manifest["parts"]}
    assert set(by_node.values()) == set(cluster.workers())  # both worker nodes; never the head
    for name, node in by_node.items():
        assert io.part_node(str(out / name)) == node
    alone = io.read_json(str(data["alone"] / io.MANIFEST))
    assert len({p["node"] for p in alone["parts"]}) == 1 and alone["rows"] == manifest["rows"]


# ---------------------------------------------------------------- 2. a node lost mid-score


@pytest.mark.timeout(300)
def test_a_node_lost_mid_score_finishes_with_the_same_table(cluster, data, tmp_path):
    """A worker node holding a scoring actor is killed once a few parts are written, and a new
    node joins: the run finishes (exit 0) with the single-node table, row for row, every
    instance once; the parts written before the kill are kept as they were, not redone."""
    cluster.shape([2, 2])
    out, log = tmp_path / "scores", tmp_path / "score.log"
    proc = start(cluster.env, log, *score_args(data, out), *SCORE, "--address", cluster.address)
    try:
        wait_for("4 score parts", lambda: len(list(out.glob("part-*.parquet"))) >= 4, proc, log)
        # a node whose actor has scored a part already, and holds it still
        scorers = set(cluster.hosting("ScoreActor"))
        victim = next((node for node in map(io.part_node, map(str, sorted(out.glob("part-*.parquet"))))
                       if node in scorers), None)
        assert victim, f"no node that has scored a part holds a scoring actor: {scorers}"
        cluster.remove(victim)
        before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}  # done when it died
        replacement = cluster.add(2)
        finish(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    manifest = io.read_json(str(out / io.MANIFEST))
    table = read_table(out)
    assert table.equals(read_table(data["alone"]))
    assert_every_instance_once(table, data)
    total = len(manifest["parts"])
    assert len(before) < total, "the node was lost after the last part: not mid-run"
    for name, mtime in before.items():  # finished parts are never rewritten
        assert (out / name).stat().st_mtime_ns == mtime, name
    after = [p for p in manifest["parts"] if p["name"] not in before]
    print(f"\nscore, node lost: {len(before)} of {total} parts written before the kill, "
          f"{len(after)} after it ({sum(p['node'] == replacement for p in after)} by the replacement node)")


# ---------------------------------------------------------------- 3. a node lost mid-train


def registered_checkpoints(out: pathlib.Path) -> str:
    """Ray Train's record of the checkpoints its controller has registered (only those restore)."""
    snapshot = out / "ray" / "checkpoint_manager_snapshot.json"
    return snapshot.read_text() if snapshot.exists() else ""


# what a metrics line says of the training itself (not of its speed, or of where it restarted)
SAME = ("step", "tokens", "flops", "student_flops", "teacher_flops", "loss", "lr", "grad_norm", "passes",
        "eval_loss", "replica_param_sums")


@pytest.mark.timeout(400)
def test_a_node_lost_while_caching_and_one_mid_train_give_the_same_run(cluster, data, tmp_path):
    """`train` on two DDP workers (`max_failures=2`): a worker node is killed while Ray Data packs
    the token cache, and the node holding a training worker at the first checkpoint; each time a
    new node joins. The run ends with exit 0, its token cache equals the single-node run's part
    for part, and its final weights and metrics log equal that run's, exactly."""
    import torch
    from safetensors.torch import load_file

    cluster.shape([2, 2])
    out, log = tmp_path / "run", tmp_path / "train.log"
    proc = start(cluster.env, log, *train_args(data, out), "--set", "max_failures=2", "--address", cluster.address)
    cache_parts = lambda: sorted((out / "tokens").glob("*/part-*.parquet"))  # noqa: E731
    try:
        wait_for("2 token cache parts", lambda: len(cache_parts()) >= 2, proc, log)
        workers = cluster.workers()
        packer = next((node for node in (io.part_node(str(p)) for p in cache_parts()) if node in workers), None)
        assert packer, f"no worker node packed the first cache parts: {workers}"
        cluster.remove(packer)
        cache_before = {p.name: p.stat().st_mtime_ns for p in cache_parts()}
        cluster.add(2)
        wait_for("a checkpoint", lambda: "step-00000020" in registered_checkpoints(out), proc, log, timeout=300)
        trainer = cluster.hosting("RayTrainWorker")[0]
        cluster.remove(trainer)
        cluster.add(2)
        finish(proc, log, timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    alone = data["train_alone"]
    (cache,), (cache_alone,) = (out / "tokens").iterdir(), (alone / "tokens").iterdir()
    manifest = io.read_json(str(cache / io.MANIFEST))
    assert cache.name == cache_alone.name and manifest == io.read_json(str(cache_alone / io.MANIFEST))
    assert len(cache_before) < len(manifest["parts"]), "the node was lost after the last cache part"
    for part in manifest["parts"]:
        assert pq.read_table(cache / part["name"]).equals(pq.read_table(cache_alone / part["name"])), part["name"]
    # packed on more than one node: the killed one packed the first parts, others the rest
    packed_after = {io.part_node(str(cache / p["name"])) for p in manifest["parts"] if p["name"] not in cache_before}
    assert packed_after and packer not in packed_after

    rows, rows_alone = read_metrics(out), read_metrics(alone)
    restored = [r["resumed_from"] for r in rows if "resumed_from" in r]
    assert restored and restored[0] >= 20, "the training worker's node was lost after the run ended"
    assert [r["step"] for r in rows] == list(range(1, 101))
    assert [{k: r[k] for k in SAME if k in r} for r in rows] == [{k: r[k] for k in SAME if k in r} for r in rows_alone]
    final = load_file(out / "final" / "model.safetensors")
    final_alone = load_file(alone / "final" / "model.safetensors")
    assert final.keys() == final_alone.keys()
    for name in final:
        assert torch.equal(final[name], final_alone[name]), name
    # (a packing task lost after writing its part is retried and writes the same part again)
    rewritten = sum((cache / name).stat().st_mtime_ns != mtime for name, mtime in cache_before.items())
    print(f"\ntrain, nodes lost: {len(cache_before)} of {len(manifest['parts'])} token cache parts packed "
          f"before the first kill ({rewritten} of them packed again after it); training restored from step "
          f"{restored[0]} after the second")


def read_metrics(out: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


# ---------------------------------------------------------------- 4. a path one node cannot see


def unshare_command() -> list[str] | None:
    """`unshare` giving a process a mount namespace of its own (as root, or through a user
    namespace), or None where this machine does not allow it."""
    if not shutil.which("unshare"):
        return None
    cmd = ["unshare", "--mount", "--propagation", "private", *([] if os.geteuid() == 0 else ["--map-root-user"])]
    try:
        done = subprocess.run([*cmd, "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return cmd if done.returncode == 0 else None


@pytest.mark.timeout(300)
def test_a_local_path_one_node_cannot_see_is_refused_before_work(cluster, data, tmp_path):
    """A worker node joins whose processes run in a mount namespace of their own, where the
    folder holding the instances and the model is an empty tmpfs: on a real cluster, a node
    without the driver's disk or mount. `score` is refused before any part is scored, naming
    the path, the node and what works instead; `train` before its token cache or workers."""
    from conftest import kill_tree

    unshare = unshare_command()
    if unshare is None:
        pytest.skip("this machine gives no process a mount namespace of its own (unshare)")
    cluster.shape([2, 2])
    known = set(cluster.alive())
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "node-manager-port", "object-manager-port")]
    script = (f"mount -t tmpfs hidden {data['root']} && exec {ray} start --address={cluster.address} "
              f"--num-cpus=1 --block --disable-usage-stats {' '.join(ports)}")
    log = open(tmp_path / "node.log", "w")
    node = subprocess.Popen([*unshare, "sh", "-c", script], env=cluster.env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (joined := set(cluster.alive()) - known):
            assert node.poll() is None and time.monotonic() < deadline, (tmp_path / "node.log").read_text()[-3000:]
            time.sleep(0.5)
        (blind,) = joined
        out = tmp_path / "scores"
        started = time.monotonic()
        result = miniplm(cluster.env, *score_args(data, out), *SCORE, "--address", cluster.address, timeout=180)
        took = time.monotonic() - started
        # train too, before its token cache or any worker: its corpus is as hidden from that node
        run = tmp_path / "train"
        trained = miniplm(cluster.env, *train_args(data, run), "--address", cluster.address, timeout=180)
    finally:
        kill_tree(node.pid)
        node.wait(timeout=60)
        log.close()
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    message = result.stderr
    assert f"--instances: {data['instances']} is a local path and node {blind}" in message, message[-3000:]
    assert "cannot see it" in message and "URL" in message and "mounted" in message
    assert not list(out.glob("part-*.parquet")) and took < 120
    assert trained.returncode == 2, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert f"data.path: {data['instances']} is a local path and node {blind}" in trained.stderr, trained.stderr[-3000:]
    assert not (run / "tokens").exists() and not (run / "ray").exists()


# ---------------------------------------------------------------- 6. never hang silently


@pytest.mark.timeout(300)
def test_one_cpu_worker_nodes_refuse_pools_that_leave_no_cpu_for_the_data(cluster, data, tmp_path):
    """Two worker nodes of 1 CPU: two scoring actors of 1 CPU (the default) would hold both, and
    the tasks that read the parts would never start (a run measured silent for 9 minutes). `score`
    and `train` are refused in seconds instead, before any work, saying why."""
    cluster.shape([1, 1])
    out = tmp_path / "scores"
    result = miniplm(cluster.env, *score_args(data, out), "--workers", "2", "--address", cluster.address, timeout=180)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 scoring worker(s) x 1 CPUs leave less than 0.5 of the cluster's 2 CPUs" in result.stderr
    assert not list(out.glob("part-*.parquet"))
    run = tmp_path / "run"
    result = miniplm(cluster.env, *train_args(data, run), "--set", "cpus_per_worker=1", "--address", cluster.address,
                     timeout=180)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 worker(s) x 1 CPUs leave none of the cluster's 2 CPUs for streaming the data" in result.stderr
    assert not (run / "tokens").exists()


@pytest.mark.timeout(300)
def test_a_cluster_stopped_uncleanly_is_reported_in_seconds(cluster, data, tmp_path):
    """The head is lost (its GCS and raylet killed); the address file Ray left names it still. A
    stage started with no --address is told in seconds that the cluster does not answer, and what
    to do, instead of retrying the dead address for minutes without a word. (Runs last: it ends
    the module's cluster.)"""
    cluster.call(op="kill_head")
    address_file = pathlib.Path(cluster.temp) / "ray" / "ray_current_cluster"
    assert address_file.read_text().strip() == cluster.address
    started = time.monotonic()
    result = miniplm(cluster.env, "prepare", str(data["root"] / "raw"), "--output", str(tmp_path / "inst"),
                     timeout=180)
    took = time.monotonic() - started
    assert result.returncode == 1 and took < 60, (took, result.stderr[-3000:])
    assert f"the Ray cluster at {cluster.address} (found in the address file" in result.stderr, result.stderr[-3000:]
    assert "ray stop" in result.stderr and "--address local" in result.stderr
    assert not list((tmp_path / "inst").glob("part-*.parquet"))


STALLED = """
import sys
from miniplm.runtime import init_ray, map_parts


def nothing(x):
    return x


init_ray("local")
for _ in map_parts(nothing, [(1,)], "probe", num_cpus=64):  # no node has 64 CPUs
    pass
"""


def test_a_stage_that_cannot_start_says_what_it_waits_for(tmp_path):
    """A stage whose tasks no node can place (64 CPUs asked of a 2-CPU machine) does not wait in
    silence: once its bar has not moved for MINIPLM_STALL_S, one line says what Ray is waiting
    to place and what is free. Its own local Ray, as a user's command starts one."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(MINIPLM_STALL_S="5", RAY_TMPDIR=tempfile.mkdtemp(prefix="st", dir="/tmp"))
    proc = subprocess.Popen([sys.executable, "-c", STALLED], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    said, deadline = None, time.monotonic() + 120
    try:
        while said is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if "no progress for" in line:
                said = line.split("\r")[-1]
    finally:
        stop_ray_started_by(proc, env["RAY_TMPDIR"])
    assert said is not None, "no line about the stalled stage within 120 s"
    assert said.startswith("probe: no progress for") and "waiting to place 1 task(s)/actor(s)" in said, said
    assert "1 x {'CPU': 64.0}" in said and re.search(r"with \d+ CPU, 0 GPU, [\d.]+ GiB memory free", said), said


def stop_ray_started_by(proc: subprocess.Popen, ray_tmpdir: str) -> None:
    """The driver interrupted (its Ray shuts down), then whatever is left of that Ray (its
    processes name its temp dir) killed by PID; the temp dir removed."""
    import psutil

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(ray_tmpdir in arg for arg in p.info["cmdline"] or ()):
            try:
                p.kill()
            except psutil.Error:
                pass
    shutil.rmtree(ray_tmpdir, ignore_errors=True)
