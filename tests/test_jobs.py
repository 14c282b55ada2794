"""The stages as Ray jobs: `ray start --head` on free ports, `ray job submit jobs/job_score.py`."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest
from conftest import free_port, kill_tree, write_jsonl

from miniplm import io
from miniplm.data.prepare import PrepareConfig, run_prepare

REPO = pathlib.Path(__file__).resolve().parents[1]
# the `ray` command of this Python's environment (found even when its bin/ is not on PATH)
RAY = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"


@pytest.fixture()
def ray_head():
    """A real local cluster started the way users start one; stopped by signalling only the
    processes it started (never `ray stop`, which would kill every Ray on the machine)."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a limit
    gcs_port, dashboard_port = free_port(), free_port()
    # every port on its own: the session's in-process Ray already holds the default agent ports
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    # as the README says: token authentication on, the token in ~/.ray/auth_token (which any
    # earlier `miniplm` command, or this session's own ray.init, created)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}", *ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # any HTTP answer means it is up (401 under token auth)
            break
        except OSError:
            if time.time() > deadline or head.poll() is not None:
                os.killpg(head.pid, signal.SIGTERM)
                pytest.fail("ray start --head did not come up")
            time.sleep(0.5)
    yield url, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:  # its graceful stop waits ~30 s on agents; nothing to keep
        kill_tree(head.pid)  # the head's daemons and their workers (own process groups)
        head.wait(timeout=60)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(400)
def test_score_job_through_ray_job_submit(ray_head, documents, llama_dir, tmp_path, ray_session):
    url, env = ray_head
    # the head enforces token auth: a client that does not send the token is turned away
    anonymous = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    refused = subprocess.run([RAY, "job", "list", "--address", url], env=anonymous,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "authentication token" in (refused.stdout + refused.stderr).lower()
    write_jsonl(tmp_path / "raw" / "docs.jsonl", [{"text": d} for d in documents[:12]])
    manifest = run_prepare(PrepareConfig(inputs=[str(tmp_path / "raw")],
                                         output=str(tmp_path / "instances"), rows_per_part=5))
    out = tmp_path / "scores"
    command = [RAY, "job", "submit", "--address", url, "--working-dir", str(REPO), "--",
               sys.executable, "jobs/job_score.py", "--instances", str(tmp_path / "instances"),
               "--model", str(llama_dir), "--output", str(out), "--cpus-per-worker", "0.5"]
    for _ in range(30):  # the dashboard answers a few seconds before its job agent does
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        if "No available agent" not in result.stderr:
            break
        time.sleep(2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout + result.stderr
    scores = io.read_json(str(out / io.MANIFEST))
    assert scores["rows"] == manifest["instances"]
    ids = sorted(i for p in scores["parts"] for i in pq.read_table(out / p["name"])["id"].to_pylist())
    assert len(ids) == len(set(ids)) == manifest["instances"]
