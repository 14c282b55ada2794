"""Benchmark the training input on a synthetic token cache: the sampler (a per-pass seeded
order of parts, a shuffled window in memory, resume by position) against the Ray Data path it
replaced (a global `random_shuffle` per pass, resume by re-reading and discarding consumed
batches), side by side in one run.

    python jobs/bench_input.py [--tokens 1e9] [--seq-len 1024] [--micro-batch 8] [--batches 2000]

Prints, for each path: seconds to the first batch of a pass, steady tokens/s over `--batches`
micro-batches, seconds to the first batch of a run resumed `--resume-at` batches into the pass,
how many cache rows were read before a resumed run's first batch, and peak RSS (this
process; Ray's object store is shared memory beside it).
"""

from __future__ import annotations

import argparse
import pathlib
import resource
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa

from miniplm import io


def write_cache(root: pathlib.Path, tokens: int, seq_len: int, parts: int) -> dict:
    rng = np.random.default_rng(0)
    per = tokens // seq_len // parts
    entries = []
    for k in range(parts):
        ids = rng.integers(0, 32000, per * seq_len, dtype=np.int32)
        name = f"part-{k:05d}.parquet"
        io.write_parquet(str(root / name), pa.table(
            {"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids), seq_len)}))
        entries.append({"name": name, "rows": per})
    return {"parts": entries, "sequences": per * parts}


def timed(batches, n: int, seq_len: int, micro_batch: int) -> tuple[float, float]:
    """(seconds to the first batch, tokens/s over the next n - 1)."""
    start = time.perf_counter()
    next(batches)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n - 1):
        next(batches)
    return first, (n - 1) * micro_batch * seq_len / (time.perf_counter() - start)


def sampler_path(root, manifest, args) -> dict:
    from miniplm.data.sampler import CacheSampler

    make = lambda: CacheSampler(str(root), manifest, seed=0, rank=0, world=1,  # noqa: E731
                                window=args.window, micro_batch=args.micro_batch)
    first, rate = timed(iter(make().epoch_batches(0)), args.batches, args.seq_len, args.micro_batch)
    start = time.perf_counter()
    resumed = make()
    next(iter(resumed.epoch_batches(0, start=args.resume_at)))
    return {"first": first, "rate": rate, "resume": time.perf_counter() - start,
            "resume_rows_read": resumed.rows_read}


def ray_data_path(root, manifest, args) -> dict:
    import ray
    import torch

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ray.data.DataContext.get_current().enable_progress_bars = False
    parts = [str(root / p["name"]) for p in manifest["parts"]]

    def batches():  # what train.py did: read, global shuffle, one worker's stream
        ds = ray.data.read_parquet(parts).random_shuffle(seed=0)
        for b in ds.iter_torch_batches(batch_size=args.micro_batch, drop_last=True, dtypes=torch.long):
            yield b["input_ids"]

    stream = batches()
    first, rate = timed(stream, args.batches, args.seq_len, args.micro_batch)
    stream.close()
    start = time.perf_counter()
    stream = batches()
    for _ in range(args.resume_at + 1):  # the old resume: re-read and drop what was consumed
        next(stream)
    resume = time.perf_counter() - start
    stream.close()
    ray.shutdown()
    # the global shuffle reads every row before its first batch, then the consumed ones again
    consumed = (args.resume_at + 1) * args.micro_batch
    return {"first": first, "rate": rate, "resume": resume, "resume_rows_read": manifest["sequences"] + consumed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=float, default=1e9)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--parts", type=int, default=100)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--window", type=int, default=8, help="sampler: parts shuffled together")
    parser.add_argument("--batches", type=int, default=2000, help="micro-batches timed per pass")
    parser.add_argument("--resume-at", type=int, default=2000, help="micro-batches consumed before the resume")
    parser.add_argument("--skip-ray-data", action="store_true", help="time only the sampler")
    args = parser.parse_args()
    root = pathlib.Path(tempfile.mkdtemp(prefix="bench_input_"))
    try:
        start = time.perf_counter()
        manifest = write_cache(root, int(args.tokens), args.seq_len, args.parts)
        print(f"synthetic cache: {manifest['sequences'] * args.seq_len:,} tokens in {args.parts} parts "
              f"({time.perf_counter() - start:.0f}s to write)", flush=True)
        rows = {"sampler": sampler_path(root, manifest, args)}
        rss_sampler = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"sampler done (peak RSS so far {rss_sampler:.2f} GB)", flush=True)
        if not args.skip_ray_data:
            rows["ray data shuffle"] = ray_data_path(root, manifest, args)
        print(f"\n| path | first batch (s) | tokens/s | resume at batch {args.resume_at} (s) | rows read to resume |")
        print("|---|---|---|---|---|")
        for name, r in rows.items():
            print(f"| {name} | {r['first']:.2f} | {r['rate']:,.0f} | {r['resume']:.2f} | {r['resume_rows_read']:,} |")
        if len(rows) == 2:
            s, d = rows["sampler"], rows["ray data shuffle"]
            print(f"\nsampler / ray data: first batch {d['first'] / s['first']:.1f}x sooner, "
                  f"tokens/s {s['rate'] / d['rate']:.2f}x, resume {d['resume'] / s['resume']:.1f}x sooner")
        print(f"peak RSS: sampler {rss_sampler:.2f} GB; whole process "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
