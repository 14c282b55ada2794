"""Benchmark the prepare stage on many short documents: rows/s and peak memory.

    python jobs/bench_prepare.py [--docs 10000000] [--files 100] [--data DIR]

Writes --files JSONL files holding --docs short documents in all (one to three sentences
each, ~60-250 bytes; the shape of a deduplicated web or chat corpus after filtering), or
reuses the ones in --data, then times `prepare` over them into a fresh output folder and
prints its wall time, rows/s, the driver's peak RSS and the peak of the summed RSS / PSS of
every process of the Ray it starts (sampled in a thread, as jobs/bench_select.py does).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import tempfile
import time

import numpy as np

from jobs.bench_select import GB, MemorySampler

WORDS = ("the model data token corpus teacher student reference score select train loss "
         "learning rate batch shard worker cluster memory disk parquet text instance part "
         "every small large fast slow good bad new old first last next").split()


def write_file(path: str, n_docs: int, seed: int) -> int:
    """One JSONL file of `n_docs` short documents; returns its size in bytes."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    lengths = rng.integers(8, 40, n_docs)  # words per document
    flat = words[rng.integers(0, len(words), int(lengths.sum()))]
    ends = np.cumsum(lengths)
    with open(path, "w") as f:
        for start, end in zip(ends - lengths, ends):
            f.write(json.dumps({"text": " ".join(flat[start:end]).capitalize() + "."}) + "\n")
    return os.path.getsize(path)


def write_corpus(root: pathlib.Path, docs: int, files: int) -> None:
    import ray

    root.mkdir(parents=True, exist_ok=True)
    per = docs // files
    task = ray.remote(write_file)
    sizes = ray.get([task.remote(str(root / f"shard-{k:03d}.jsonl"), per, k) for k in range(files)])
    print(f"synthetic corpus: {per * files:,} documents in {files} files, {sum(sizes) / GB:.2f} GB",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=10_000_000)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--rows-per-part", type=int, default=100_000)
    parser.add_argument("--data", help="folder of synthetic JSONL files to reuse (written there when absent)")
    args = parser.parse_args()
    import ray

    from miniplm.data.prepare import PrepareConfig, run_prepare

    # a Ray of our own (not any cluster already running on the machine), so we measure only it
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    base = pathlib.Path(args.data or tempfile.mkdtemp(prefix="bench_prepare_"))
    raw, out = base / "raw", base / "instances"
    if not raw.exists():
        start = time.perf_counter()
        write_corpus(raw, args.docs, args.files)
        print(f"  written in {time.perf_counter() - start:.1f}s", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    with MemorySampler() as sampler:
        manifest = run_prepare(PrepareConfig(inputs=[str(raw)], output=str(out), max_chars=8192,
                                             rows_per_part=args.rows_per_part))
    rows, seconds = manifest["instances"], sampler.seconds
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"\nprepare over {args.files} files: {rows:,} instances in {seconds:.1f}s ({rows / seconds:,.0f} rows/s, "
          f"{rows / seconds / os.cpu_count():,.0f} per CPU)\n"
          f"  driver peak RSS {peak / GB:.2f} GB (kernel ru_maxrss)\n"
          + sampler.report())

if __name__ == "__main__":
    main()
