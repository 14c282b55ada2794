"""Local paths on a Ray cluster of several nodes: every node must see, at a path the driver
gives, what the driver sees there. A worker node that cannot (a path on the driver's own disk,
a mount missing on one machine) would fail mid-run, or worse, read something else; so before
any work a probe task pinned to each other alive node looks at every local path and the stage
is refused, naming the path and the node, when one of them sees something else or nothing.

An input is looked at, never written: a file by its size and modification time, a folder by
the names in it. An output folder (held by this run) gets a probe file with a random token,
which every node must read back. URLs are not checked (every node reaches them alike), and a
cluster of one node costs nothing.
"""

from __future__ import annotations

import hashlib
import os
import uuid

REMEDY = ("every node must see the same files there: give a URL (s3://, gs://, hf://), a path on "
          "storage mounted at the same place on every node, or, for a model, a Hub id")
PROBE_WAIT_S = 60.0  # a node that has not answered by then (still starting, dying) is not judged


def view(path: str, token_file: str | None = None) -> str | None:
    """What this machine sees at `path` (None: nothing). With `token_file`, the content of that
    file (an output's probe)."""
    try:
        if token_file is not None:
            with open(token_file) as f:
                return f"the probe {f.read()}"
        if os.path.isdir(path):
            names = sorted(os.listdir(path))
            digest = hashlib.sha256("\n".join(names).encode("utf-8", "surrogateescape")).hexdigest()[:16]
            return f"a folder of {len(names)} entries (names {digest})"
        st = os.stat(path)
        return f"a file of {st.st_size} bytes modified at {st.st_mtime_ns} ns"
    except OSError:
        return None


def _look(items: list[tuple[str, str | None]]) -> tuple[str, list[str | None]]:
    import ray

    return ray.get_runtime_context().get_node_id(), [view(path, token) for path, token in items]


def _local(path: str | None) -> bool:
    return bool(path) and "://" not in path and os.path.isabs(path) and os.path.exists(path)


def check_paths_visible(inputs: dict[str, str | None], outputs: dict[str, str | None] | None = None) -> None:
    """Refuse (ValueError, before any work) a local path that some other alive node of the
    cluster does not see as the driver does. `inputs` and `outputs` map what the user called a
    path (a flag, a config key) to it; outputs must be existing folders this run holds."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"] and n["NodeID"] != here}
    checks = {what: path for what, path in inputs.items() if _local(path)}
    written = {what: path for what, path in (outputs or {}).items() if _local(path) and os.path.isdir(path)}
    if not nodes or not (checks or written):
        return
    token = uuid.uuid4().hex
    # in the folder's _tmp/, which a run clears when it starts: a killed probe leaves nothing behind
    probes = {what: os.path.join(path, "_tmp", f"probe.{token}") for what, path in written.items()}
    items, expected, names = [], [], []
    for what, path in checks.items():
        items.append((path, None))
        expected.append(view(path))
        names.append((what, path))
    for what, probe in probes.items():
        os.makedirs(os.path.dirname(probe), exist_ok=True)
        with open(probe, "w") as f:
            f.write(token)
        items.append((written[what], probe))
        expected.append(f"the probe {token}")
        names.append((what, written[what]))
    look = ray.remote(num_cpus=0, max_retries=0)(_look)
    try:
        refs = [look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(items)
                for node in nodes]
        ready, late = ray.wait(refs, num_returns=len(refs), timeout=PROBE_WAIT_S)
        for ref in late:
            ray.cancel(ref, force=True)
        for ref in ready:
            try:
                node, seen = ray.get(ref)
            except ray.exceptions.RayError:  # the node went away meanwhile: nothing runs there
                continue
            for (what, path), want, got in zip(names, expected, seen):
                if got != want:
                    where = f"node {node} ({nodes[node].get('NodeManagerAddress', '?')})"
                    sees = "cannot see it" if got is None else f"sees something else there ({got}; here: {want})"
                    raise ValueError(f"{what}: {path} is a local path and {where} of the Ray cluster {sees}; "
                                     f"{REMEDY}")
    finally:
        for probe in probes.values():
            try:
                os.remove(probe)
            except OSError:
                pass
