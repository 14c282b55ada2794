"""Benchmark the select stage at scale on synthetic tables (no model needed).

    python jobs/bench_select.py [--rows 10000000]

Writes an instances dataset (short texts) and teacher/reference score tables with --rows rows
in 100 parts, then times `select` (difference, alpha 0.5) and reports peak RSS of the process.
"""

from __future__ import annotations

import pathlib
import sys

sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, not jobs/ (jobs/select.py)

import argparse  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from miniplm import io  # noqa: E402


def write_synthetic(root: pathlib.Path, rows: int, parts: int = 100) -> None:
    rng = np.random.default_rng(0)
    fp = io.RowSetHash(total=12345, count=rows)  # fingerprint value is arbitrary but shared
    manifests = {"instances": [], "teacher": [], "reference": []}
    per = rows // parts
    for k in range(parts):
        ids = pa.array([f"corpus/{k:03d}.jsonl:{i}:0" for i in range(per)])
        n_tokens = rng.integers(20, 1024, per)
        text = pa.array(np.char.add("document ", np.arange(per).astype(str)))
        name = f"part-{k:05d}.parquet"
        io.write_parquet(str(root / "instances" / name), pa.table(
            {"id": ids, "text": text, "n_bytes": n_tokens * 4, "source": pa.array(["web"] * per)}))
        manifests["instances"].append({"name": name, "rows": per, "bytes": int((n_tokens * 4).sum())})
        for role, shift in (("teacher", -2.0), ("reference", -2.5)):
            lp = (shift + rng.normal(0, 0.3, per)) * n_tokens
            io.write_parquet(str(root / role / name), pa.table(
                {"id": ids, "n_tokens": pa.array(n_tokens), "logprob": pa.array(lp.astype(np.float64))}))
            manifests[role].append({"name": name, "rows": per})
    io.write_json(str(root / "instances" / io.MANIFEST),
                  {"fingerprint": fp.hexdigest(), "parts": manifests["instances"], "instances": per * parts})
    for role in ("teacher", "reference"):
        io.write_json(str(root / role / io.MANIFEST), {"parts": manifests[role], "provenance": {
            "instances_fingerprint": fp.hexdigest(), "model_fingerprint": role,
            "tokenizer_fingerprint": "shared", "model": role}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    args = parser.parse_args()
    from miniplm.select import SelectConfig, run_select

    root = pathlib.Path(tempfile.mkdtemp(prefix="bench_select_"))
    start = time.perf_counter()
    write_synthetic(root, args.rows)
    print(f"synthetic tables: {args.rows:,} rows in {time.perf_counter() - start:.1f}s", flush=True)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    manifest = run_select(SelectConfig(instances=str(root / "instances"), teacher=str(root / "teacher"),
                                       reference=str(root / "reference"), output=str(root / "refined")))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"\nselect over {args.rows:,} rows: {seconds:.1f}s ({args.rows / seconds:,.0f} rows/s), "
          f"kept {manifest['instances']:,}; peak RSS {peak / 2**20:.2f} GB "
          f"(before select {base_rss / 2**20:.2f} GB)")


if __name__ == "__main__":
    main()
