"""Connecting to Ray: the cluster named by --address / RAY_ADDRESS (which `ray job submit`
sets for its driver), else a running local cluster, else a new in-process one."""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterator

import ray

from miniplm import console


class ClusterUnreachable(RuntimeError):
    """The Ray cluster to attach to does not answer."""


def init_ray(address: str | None = None) -> None:
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        check_reachable(address)
        console.quiet_ray()
        # workers' output (HF loading bars, Ray Train's controller) stays in Ray's log files
        with console.ray_starting():
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=console.verbose())
    console.quiet_ray_data()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # a task's own error (file, row, problem) reaches the driver as that error, not as a
    # generic "UDF failed" whose message is only in a traceback
    ctx.raise_original_map_exception = True


def check_reachable(address: str | None, timeout_s: float = 3.0) -> None:
    """Fail in seconds when the cluster Ray would attach to does not answer: `ray.init` retries a
    dead cluster's address (one left behind by a `ray start` that was never stopped) for minutes
    without a word."""
    import socket

    from ray._private.services import canonicalize_bootstrap_address

    if address and (address == "local" or "://" in address):
        return  # a fresh in-process Ray, or Ray Client, which reports its own errors
    try:
        target = canonicalize_bootstrap_address(address)
    except Exception:  # noqa: BLE001 (no cluster found, a bad address: ray.init says so itself)
        return
    if target is None:
        return
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError:
        found = ("given by --address / RAY_ADDRESS" if address else
                 "found in the address file an earlier `ray start` left behind")
        raise ClusterUnreachable(
            f"the Ray cluster at {target} ({found}) does not answer. If it was stopped or crashed, run "
            "`ray stop` to clear it, or pass --address local for a fresh in-process Ray; else check "
            "that its head node is up and reachable from here") from None


def unwrap(err: BaseException) -> BaseException:
    """The error a Ray task, actor or Ray Train worker raised, out of Ray's wrappers (a failed
    worker group: the lowest rank's error)."""
    import ray.train

    worker_group_error = getattr(ray.train, "WorkerGroupError", ())  # Ray Train V2 only
    while True:
        if isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None and err.cause is not err:
            err = err.cause
        elif isinstance(err, worker_group_error) and err.worker_failures:
            err = err.worker_failures[min(err.worker_failures)]
        else:
            return err


def waiting_for() -> str:
    """What Ray cannot place now, in one line: the resource requests of the tasks and actors
    waiting for a node that has them, against what the cluster has free. Asked of the GCS, as
    `ray status` does (no dashboard needed)."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    try:
        demands = get_cluster_status(ray.get_runtime_context().gcs_address).resource_demands
    except Exception as err:  # noqa: BLE001 (an older or unreachable GCS: say so rather than fail the stage)
        return f"Ray's cluster status did not answer ({type(err).__name__}); see `ray status`"
    asks = [(r.bundle, r.count) for d in demands.ray_task_actor_demand for r in d.bundles_by_count]
    asks += [(r.bundle, r.count) for d in demands.placement_group_demand for r in d.bundles_by_count]
    available = ray.available_resources()
    free = ", ".join([f"{available.get(k, 0):g} {k}" for k in ("CPU", "GPU")]
                     + [f"{available.get('memory', 0) / 2**30:.1f} GiB memory"])
    if not asks:
        return f"Ray has no task waiting for resources ({free} free): the work itself is slow; see `ray status`"
    waiting = sum(n for _, n in asks)
    said = ", ".join(f"{n} x {dict(sorted(bundle.items()))}" for bundle, n in asks[:3])
    return (f"Ray is waiting to place {waiting} task(s)/actor(s) ({said}) with {free} free: add nodes, "
            "or ask for less (--workers, --cpus-per-worker)")


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1))


def map_parts(fn: Callable, calls: list[tuple], desc: str, num_cpus: float = 1) -> Iterator[tuple[int, object]]:
    """`fn(*args)` for each args in `calls`, one Ray task each, a few in flight; yields
    (index, result) as tasks finish. A task's own error is raised as that error."""
    remote = ray.remote(num_cpus=num_cpus)(fn)
    todo = iter(enumerate(calls))
    in_flight: dict = {}
    window = max(2, int(2 * cluster_cpus()))
    bar = console.progress(len(calls), desc=desc, unit="part", waiting_for=waiting_for)
    try:
        for i, args in todo:
            in_flight[remote.remote(*args)] = i
            if len(in_flight) >= window:
                break
        while in_flight:
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            i = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as err:
                raise unwrap(err) from None
            for j, args in todo:  # refill: one finished, one more
                in_flight[remote.remote(*args)] = j
                break
            bar.update(1)
            yield i, result
    finally:
        bar.close()
        for ref in in_flight:
            ray.cancel(ref)
