"""Connecting to Ray: the cluster named by --address / RAY_ADDRESS (which `ray job submit`
sets for its driver), else a running local cluster, else a new in-process one."""

from __future__ import annotations

import logging
import os

import ray


def init_ray(address: str | None = None) -> None:
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        # Ray Data's per-operator progress bars flood a terminal; our stages draw their own.
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        ray.init(address=address, logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # a task's own error (file, row, problem) reaches the driver as that error, not as a
    # generic "UDF failed" whose message is only in a traceback
    ctx.raise_original_map_exception = True


def unwrap(err: BaseException) -> BaseException:
    """The error a Ray task or actor raised, out of Ray's wrappers."""
    while isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None and err.cause is not err:
        err = err.cause
    return err


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1))
