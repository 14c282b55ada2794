"""One run per output: a lease file (`_lease.json`) that a run holds on its output folder.

The lease names its holder (host, pid, stage, start) and carries a heartbeat that a thread
refreshes while the run lives. A second run on a held output refuses at once, naming the
holder. A lease whose holder is gone is taken over, and said so: a dead pid on this host, or,
from another host, a heartbeat older than STALE_AFTER_S (10 minutes; MINIPLM_LEASE_STALE_S). The lease is created with an
exclusive write (O_EXCL on local disk, a conditional put on object stores that support it),
so two runs starting together cannot both win.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import threading
import time
import uuid

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

LEASE = "_lease.json"
HEARTBEAT_S = float(os.environ.get("MINIPLM_LEASE_HEARTBEAT_S", 30))
STALE_AFTER_S = float(os.environ.get("MINIPLM_LEASE_STALE_S", 600))


_HELD: set[str] = set()  # tokens of the leases this process holds now


class OutputBusy(RuntimeError):
    """Another live run holds the output's lease."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), so a recycled pid is not taken for the holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return started is None or _process_start(pid) in (None, started)


class Lease:
    """`with Lease(root, stage):` holds `root` for this run; released on exit, even on error."""

    def __init__(self, root: str, stage: str):
        self.root, self.stage = root, stage
        self.fs, path = url_to_fs(root)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.path = posixpath.join(path, LEASE)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self) -> dict:
        pid = os.getpid()
        return {"stage": self.stage, "host": socket.gethostname(), "pid": pid,
                "pid_started": _process_start(pid), "token": self.token,
                "started": self._started, "heartbeat": time.time()}

    def __enter__(self) -> "Lease":
        return self if self._thread is not None else self.acquire()  # (taken already by acquire/wait)

    def acquire(self) -> "Lease":
        """Take the lease, or raise OutputBusy naming the live run that holds it."""
        busy = self.try_acquire()
        if busy is not None:
            raise OutputBusy(f"{self.root} is in use by another run: {describe(busy)}. Wait for it to "
                             "finish or stop it; use another output for a parallel run")
        return self

    def wait(self, poll_s: float = 2.0) -> "Lease":
        """Acquire, waiting while a live run holds the folder (said once)."""
        said = False
        while (busy := self.try_acquire()) is not None:
            if not said:
                print(f"{self.stage}: waiting for {self.root}, held by {describe(busy)}", flush=True)
                said = True
            time.sleep(poll_s)
        return self

    def try_acquire(self) -> dict | None:
        """Take the lease (over a holder that is gone, said so); the live holder when busy."""
        self._started = time.time()
        self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        if not self._create():
            holder = self.holder()
            if holder is not None and self.is_live(holder):
                return holder
            if holder is not None:  # (None: released since; nothing to take over)
                print(f"lease: {self.root} was held by a run that is gone ({describe(holder)}); taking it over",
                      flush=True)
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(self.path)
            if not self._create():  # another run took it over in the meantime
                return self.holder() or {}
        _HELD.add(self.token)
        self._thread = threading.Thread(target=self._beat, name="miniplm-lease", daemon=True)
        self._thread.start()
        return None

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        _HELD.discard(self.token)
        # a lease that cannot be removed (the disk turned read-only, say) is left behind: the
        # next run sees its holder gone, and the error that ended this run stays the one shown
        with contextlib.suppress(OSError):
            holder = self.holder()
            if holder and holder.get("token") == self.token:
                self.fs.rm(self.path)

    def holder(self) -> dict | None:
        try:
            with self.fs.open(self.path, "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except ValueError:  # torn by a crash mid-write: nobody can be holding it
            return {}

    @staticmethod
    def is_live(holder: dict) -> bool:
        if not holder:
            return False
        if holder.get("host") == socket.gethostname():
            if int(holder["pid"]) == os.getpid():  # this process: live only while it holds it
                return holder.get("token") in _HELD
            return _pid_alive(int(holder["pid"]), holder.get("pid_started"))
        return time.time() - float(holder.get("heartbeat", 0)) < STALE_AFTER_S

    def _create(self) -> bool:
        """Write the lease only if none exists; False when one does."""
        data = json.dumps(self.record()).encode()
        if self.local:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        try:  # s3fs: a conditional put (If-None-Match); elsewhere fsspec's check-then-write
            self.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            return False
        except TypeError:  # an fsspec from before pipe_file's `mode`: check, then write
            if self.fs.exists(self.path):
                return False
            self.fs.pipe_file(self.path, data)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                holder = self.holder()
            except OSError:  # a transient storage error: the next beat tries again
                continue
            if not holder or holder.get("token") != self.token:
                return  # taken over (this run was presumed dead): never write over the new holder
            data = json.dumps(self.record()).encode()
            with contextlib.suppress(OSError):
                if self.local:
                    tmp = f"{self.path}.{self.token}"
                    with open(tmp, "wb") as f:
                        f.write(data)
                    os.replace(tmp, self.path)
                else:
                    self.fs.pipe_file(self.path, data)


def describe(holder: dict | None) -> str:
    if not holder:
        return "an unreadable lease"
    age = time.time() - float(holder.get("heartbeat", 0))
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return (f"miniplm {holder.get('stage')}, pid {holder.get('pid')} on {holder.get('host')}, "
            f"started {started}, last heartbeat {age:.0f}s ago")
