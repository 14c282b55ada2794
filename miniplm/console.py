"""What a stage prints: a line when it starts, a progress bar, a summary line when it ends.
Resolved configs and Ray's own logs are shown only with `--verbose`; they are always kept in
files (the config beside each output, Ray's logs in its session folder)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import Callable, Iterator

VERBOSE_ENV = "MINIPLM_VERBOSE"  # an env var, so a job's driver and subprocesses see it too

# Ray driver messages a user can do nothing about on a healthy run
_NOISY_RAY_LOGGERS = ("ray._private.authentication.authentication_token_setup",)


STALL_ENV = "MINIPLM_STALL_S"  # seconds without progress before a bar says what it waits for


def progress(total: int, desc: str, unit: str, initial: int = 0,
             waiting_for: Callable[[], str] | None = None):
    """A stage's progress bar. It makes way for the stage's summary line when it closes. With
    `waiting_for`, a bar that has not moved for a few minutes says, once, what the stage waits
    for (a slow start and a cluster too small for the work look alike otherwise)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False)
    if waiting_for is not None:
        stall_s = float(os.environ.get(STALL_ENV, 180))
        threading.Thread(target=_watch, args=(bar, stall_s, waiting_for), name="stall-watch", daemon=True).start()
    return bar


def _watch(bar, stall_s: float, waiting_for: Callable[[], str]) -> None:
    seen, since = bar.n, time.monotonic()
    while not bar.disable:  # tqdm disables a bar when it closes
        time.sleep(min(stall_s / 4, 10.0))
        if bar.n != seen:
            seen, since = bar.n, time.monotonic()
        elif time.monotonic() - since >= stall_s:
            bar.write(f"{bar.desc}: no progress for {time.monotonic() - since:.0f}s; {waiting_for()}")
            return


def set_verbose(on: bool) -> None:
    os.environ[VERBOSE_ENV] = "1" if on else "0"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def detail(text: str) -> None:
    """Debug detail (a resolved config, a formula): printed only with --verbose."""
    if verbose():
        print(text, flush=True)


def quiet_ray() -> None:
    """Before `ray.init`: keep Ray's INFO/WARNING chatter and its C++ error lines about its own
    internals (an actor's restart policy) off the console; they stay in Ray's log files. A
    failure still reaches the user as the exception of the task, actor or worker that raised it."""
    if verbose():
        return
    # C++ log level of the processes this driver starts (an in-process cluster) and of the driver
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # our stages draw their own
    for name in _NOISY_RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def ray_starting() -> Iterator[None]:
    """Around `ray.init`: its C++ core worker writes a line straight to the terminal's stderr when
    the log level comes from the environment (as `quiet_ray` sets it); the same line is in Ray's
    driver log file. An error of `ray.init` itself is raised, not printed, so nothing is lost."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quiet_ray_data() -> None:
    """After Ray Data is imported (it installs its own console handler at INFO): errors only."""
    import ray.data  # noqa: F401 (its import installs the handler)

    if verbose():
        return
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)
