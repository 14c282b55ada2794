"""The D_ref split: an instances dataset divided by a seeded hash of each text into D_ref
(held out of selection; the reference trains on it) and the pool (scored and selected). Keyed
on the text, so copies of a text land together, on every machine."""

from __future__ import annotations

import contextlib

import pyarrow as pa
import pyarrow.compute as pc

from miniplm import io


def split_part(src: str, name: str, fraction: float, seed: int, inside: str, outside: str) -> dict:
    """Ray task: one instances part split by a seeded hash of each text; each non-empty half is
    written under the part's name. Returns per half its part entry and fingerprint state."""
    from miniplm.data.tokens import in_subset

    table = io.read_part(io.join(src, name))
    # keyed on the text, not the id (file:row): a text sits on one side wherever it appears, so
    # a model trained on one corpus's D_ref never saw the pool of another (other package versions)
    mask = in_subset(table["text"].to_pylist(), fraction, seed)
    halves = {}
    for root, keep in ((inside, mask), (outside, ~mask)):
        sub = table.filter(pa.array(keep))
        if not sub.num_rows:
            continue
        io.write_parquet(io.join(root, name), sub)
        fp = io.RowSetHash()
        for id_, text in zip(sub["id"].to_pylist(), sub["text"].to_pylist()):
            fp.add(id_, text)
        halves[root] = {"part": {"name": name, "rows": sub.num_rows, "bytes": pc.sum(sub["n_bytes"]).as_py()},
                        "hash": fp.state()}
    return halves


def split_instances(src: str, fraction: float, seed: int, inside: str, outside: str) -> None:
    """Split an instances dataset by a seeded hash of each text: `inside` gets ~fraction, copies
    of a text land together. One Ray task per part; the driver only adds up part entries and
    fingerprints."""
    from miniplm.io import read_instances_manifest

    manifest = read_instances_manifest(src)
    job = {"stage": "split", "instances_fingerprint": manifest["fingerprint"], "fraction": fraction, "seed": seed,
           "key": "text"}
    # a pipeline step: `run` and `demo` have no --overwrite (a folder from before D_ref was keyed
    # on the text lands here)
    remedy = "Remove the run folder, or give the run (`miniplm demo --output`, the YAML's `output`) another one."
    with contextlib.ExitStack() as held:
        finished = [held.enter_context(io.claim_output(root, job, overwrite=False, what="a split", remedy=remedy,
                                                       inputs=[src])) for root in (inside, outside)]
        if all(finished):
            print("split: already complete; nothing to do")
            return
        _split_into(manifest, src, fraction, seed, inside, outside, job)


def _split_into(manifest: dict, src: str, fraction: float, seed: int, inside: str, outside: str, job: dict) -> None:
    from miniplm.runtime import init_ray, map_parts

    init_ray()
    names = [io.plain_name(part["name"], f"{src}/{io.MANIFEST} part") for part in manifest["parts"]]
    results = [None] * len(names)
    calls = [(src, name, fraction, seed, inside, outside) for name in names]
    for k, halves in map_parts(split_part, calls, "split"):
        results[k] = halves
    counts = {}
    for root in (inside, outside):
        halves = [r[root] for r in results if root in r]
        fp = io.RowSetHash()
        for half in halves:
            fp.merge(io.RowSetHash.from_state(half["hash"]))
        parts = [half["part"] for half in halves]
        io.write_manifest(root, {"stage": "split", "source": src, **job, "instances": fp.count,
                                 "bytes": sum(p["bytes"] for p in parts), "fingerprint": fp.hexdigest(),
                                 "parts": parts})
        counts[root] = fp.count
    print(f"split: {counts[inside]} instances -> {inside}, {counts[outside]} -> {outside}")
