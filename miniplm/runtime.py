"""Connecting to Ray: the cluster named by --address / RAY_ADDRESS (which `ray job submit`
sets for its driver), else a running local cluster, else a new in-process one."""

from __future__ import annotations

import logging
import os

import ray


def init_ray(address: str | None = None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray Data's per-operator progress bars flood a terminal; our stages draw their own.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(address=address, logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1))
