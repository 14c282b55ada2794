"""Benchmark the select stage at scale on synthetic tables (no model needed).

    python jobs/bench_select.py [--rows 10000000] [--parts 100] [--data DIR]

Writes an instances dataset (short texts) and teacher/reference score tables (sorted by id,
as the score stage writes them) with --rows rows in --parts parts, or reuses the ones in
--data, then times `select` (difference, alpha 0.5) and reports its wall time, the driver's
peak RSS and the peak of the summed RSS (and PSS, which counts shared object-store pages
once) of the Ray processes this run started, sampled in a thread.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import tempfile
import threading
import time

import numpy as np
import psutil
import pyarrow as pa

from miniplm import io

GB = 2**30


def write_part(root: str, k: int, per: int) -> dict:
    """One synthetic instances part and its teacher and reference parts."""
    rng = np.random.default_rng(k)
    root = pathlib.Path(root)
    name = f"part-{k:05d}.parquet"
    ids = pa.array([f"corpus/{k:03d}.jsonl:{i}:0" for i in range(per)])
    n_tokens = rng.integers(20, 1024, per)
    text = pa.array(np.char.add("document ", np.arange(per).astype(str)))
    io.write_parquet(str(root / "instances" / name), pa.table(
        {"id": ids, "text": text, "n_bytes": n_tokens * 4, "source": pa.array(["web"] * per)}))
    for role, shift in (("teacher", -2.0), ("reference", -2.5)):
        lp = (shift + rng.normal(0, 0.3, per)) * n_tokens
        table = pa.table({"id": ids, "n_tokens": pa.array(n_tokens), "logprob": pa.array(lp)})
        io.write_parquet(str(root / role / name), table.sort_by("id"))
    return {"name": name, "rows": per, "bytes": int((n_tokens * 4).sum())}


def write_synthetic(root: pathlib.Path, rows: int, parts: int) -> None:
    import ray

    per = rows // parts
    task = ray.remote(write_part)
    manifest = ray.get([task.remote(str(root), k, per) for k in range(parts)])
    fp = io.RowSetHash(total=12345, count=per * parts)  # fingerprint value is arbitrary but shared
    io.write_json(str(root / "instances" / io.MANIFEST),
                  {"fingerprint": fp.hexdigest(), "parts": manifest, "instances": per * parts})
    for role in ("teacher", "reference"):
        io.write_json(str(root / role / io.MANIFEST), {
            "parts": [{"name": p["name"], "rows": p["rows"]} for p in manifest],
            "provenance": {"instances_fingerprint": fp.hexdigest(), "model_fingerprint": role,
                           "tokenizer_fingerprint": "shared", "model": role}})


def is_ray_worker(proc: psutil.Process) -> bool:
    """A task/actor worker (titled `ray::...`), not the raylet, GCS or other Ray services."""
    cmdline = proc.cmdline()
    return bool(cmdline) and (cmdline[0].startswith("ray::") or any("default_worker.py" in c for c in cmdline))


class MemorySampler(threading.Thread):
    """Peaks of the driver's RSS and of the summed RSS / PSS of every process it started
    (raylet, GCS, Ray workers...), sampled every `interval` seconds. As a context manager it
    also times the block (`seconds`) and notes the machine's load around it."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.stopped = interval, threading.Event()
        self.driver = self.rss = self.pss = self.workers = 0

    def run(self) -> None:
        me = psutil.Process()
        while not self.stopped.wait(self.interval):
            rss = pss = workers = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    info = proc.memory_full_info()
                    if proc.pid != me.pid and is_ray_worker(proc):
                        workers += info.rss
                except psutil.Error:  # exited while we looked
                    continue
                rss, pss = rss + info.rss, pss + info.pss
            self.driver = max(self.driver, me.memory_info().rss)
            self.rss, self.pss, self.workers = max(self.rss, rss), max(self.pss, pss), max(self.workers, workers)

    def stop(self) -> None:
        self.stopped.set()
        self.join()

    def __enter__(self) -> MemorySampler:
        self.load_before = os.getloadavg()[0]
        self.start()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started
        self.stop()
        self.load_after = os.getloadavg()[0]

    def report(self) -> str:
        """The Ray processes' peaks and the load, one indented line each."""
        return (f"  Ray worker processes, peak of summed RSS {self.workers / GB:.2f} GB\n"
                f"  driver + every Ray process, peak of summed RSS {self.rss / GB:.2f} GB, "
                f"of summed PSS {self.pss / GB:.2f} GB (sampled every {self.interval}s)\n"
                f"  machine load average (1 min) {self.load_before:.1f} before, {self.load_after:.1f} "
                f"after, on {os.cpu_count()} CPUs")


def check_sample(root: pathlib.Path, manifest: dict, n_parts: int) -> str:
    """The kept set against an independent computation, outside the timed block: the count is
    exactly floor(alpha * N), and in a seeded sample of parts (pandas, float64) every instance
    above the threshold is kept, none below it, and kept ties are the part's lowest ids."""
    from fractions import Fraction

    import pyarrow.parquet as pq

    n, alpha = manifest["candidates"], manifest["alpha"]
    assert manifest["instances"] == int(Fraction(str(alpha)) * n), (manifest["instances"], alpha, n)
    threshold = manifest["threshold"]
    names = [p["name"] for p in io.read_json(str(root / "instances" / io.MANIFEST))["parts"]]
    sample = sorted(np.random.default_rng(0).choice(len(names), min(n_parts, len(names)), replace=False))
    for name in (names[i] for i in sample):
        t, r = (pq.read_table(root / role / name).to_pandas().set_index("id") for role in ("teacher", "reference"))
        key = (t.logprob / t.n_tokens - r.logprob.loc[t.index] / r.n_tokens.loc[t.index]).sort_index()
        refined = root / "refined" / name
        kept = set(pq.read_table(refined, columns=["id"])["id"].to_pylist()) if refined.exists() else set()
        assert kept >= set(key.index[key > threshold]), name
        assert not kept & set(key.index[key < threshold]), name
        ties = list(key.index[key == threshold])
        assert set(ties[:len(kept & set(ties))]) == kept & set(ties), name
    return (f"kept set checked: {manifest['instances']:,} = floor({alpha} x {n:,}); parts "
            f"{', '.join(names[i] for i in sample)} agree with an independent pandas top-alpha")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--parts", type=int, default=100)
    parser.add_argument("--check-parts", type=int, default=5,
                        help="parts whose kept ids are checked against an independent pandas top-alpha")
    parser.add_argument("--data", help="folder of synthetic tables to reuse (written there when absent)")
    args = parser.parse_args()
    import ray

    from miniplm.selection.select import SelectConfig, run_select

    # a Ray of our own (not any cluster already running on the machine), so we measure only it
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    root = pathlib.Path(args.data or tempfile.mkdtemp(prefix="bench_select_"))
    if not (root / "instances" / io.MANIFEST).exists():
        start = time.perf_counter()
        write_synthetic(root, args.rows, args.parts)
        print(f"synthetic tables: {args.rows:,} rows in {time.perf_counter() - start:.1f}s", flush=True)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with MemorySampler() as sampler:
        manifest = run_select(SelectConfig(instances=str(root / "instances"), teacher=str(root / "teacher"),
                                           reference=str(root / "reference"), output=str(root / "refined"),
                                           overwrite=True))
    seconds = sampler.seconds
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(check_sample(root, manifest, args.check_parts))
    print(f"\nselect over {manifest['candidates']:,} rows: {seconds:.1f}s "
          f"({manifest['candidates'] / seconds:,.0f} rows/s), kept {manifest['instances']:,}\n"
          f"  driver peak RSS {peak / GB:.2f} GB (kernel ru_maxrss; before select {base_rss * 1024 / GB:.2f} GB)\n"
          + sampler.report())

if __name__ == "__main__":
    main()
