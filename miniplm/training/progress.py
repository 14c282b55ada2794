"""The driver's progress bar for a Ray Train run, drawn from the metrics log that rank 0 appends:
the workers' own output stays in Ray's log files, on any node."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import fsspec

from miniplm import console, io
from miniplm.training.loop import metrics_row


@contextlib.contextmanager
def follow_metrics(url: str, total_steps: int) -> Iterator[None]:
    """A `train` bar that follows OUTPUT/metrics.jsonl while the block runs. A local log is read
    every second; an object store's, rewritten at each checkpoint, every ten."""
    from miniplm.runtime import waiting_for

    bar = console.progress(total_steps, desc="train", unit="step", waiting_for=waiting_for)
    stop = threading.Event()
    poll_s = 1.0 if io.is_local(url) else 10.0
    said: set[str] = set()

    def show(rows: list[dict]) -> None:
        for row in rows:
            if "resumed_from" in row and "resumed" not in said:
                said.add("resumed")
                bar.write(f"train: resumed from step {row['resumed_from']}")
            if "flops_formula" in row and "flops" not in said and console.verbose():
                said.add("flops")
                bar.write(f"train: FLOPs {row['flops_formula']}; MFU against {row.get('mfu_peak_source')}")
        if rows:
            last = rows[-1]
            bar.n = last["step"]
            bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:,.0f}")

    def follow() -> None:
        tail = MetricsTail(url)
        while True:
            stopping = stop.wait(poll_s)
            show(tail.new_rows())
            if stopping:
                return

    thread = threading.Thread(target=follow, name="train-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
        bar.close()


class MetricsTail:
    """The rows a metrics log gained since the last look. A local log is appended to, so only
    its new bytes are read (a long run's log is not parsed again every second); a rewritten log
    (a new file: a restore drops the lines after its checkpoint; an object store's log is
    rewritten at every checkpoint) is read whole once more."""

    def __init__(self, url: str):
        self.url, self.identity, self.offset = url, None, 0

    def new_rows(self) -> list[dict]:
        try:
            size, version, *inode = io.file_identity(self.url)
        except FileNotFoundError:
            return []
        identity = tuple(inode) or (size, version)  # on disk the inode: appends keep it
        if identity != self.identity:
            self.identity, self.offset = identity, 0
        elif not inode or size == self.offset:
            return []  # an object unchanged, or nothing appended
        with fsspec.open(self.url, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data.rfind(b"\n") + 1  # a line still being appended waits for the next look
        self.offset += complete
        rows = []
        for line in data[:complete].split(b"\n"):
            try:
                rows.append(metrics_row(line))
            except ValueError:
                continue
        return rows
