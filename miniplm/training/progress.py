"""The driver's progress bar for a Ray Train run, drawn from the metrics log that rank 0 appends:
the workers' own output stays in Ray's log files, on any node."""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Iterator

import fsspec

from miniplm import console, io


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
        seen = 0
        while True:
            stopping = stop.wait(poll_s)
            rows = read_rows(url)
            if len(rows) < seen:  # a restored run dropped the lines after its checkpoint
                seen = 0
            show(rows[seen:])
            seen = len(rows)
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


def read_rows(url: str) -> list[dict]:
    """The complete rows of a metrics log being written: a line still being appended is skipped."""
    try:
        with fsspec.open(url, "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows
