"""The token cache: an instances dataset tokenised with a model's tokenizer and packed into
fixed-length sequences (EOS after every document), written once by Ray Data tasks as Parquet
parts that training streams from."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from miniplm import io
from miniplm.config import field
from miniplm.models import load_tokenizer, tokenizer_fingerprint


@dataclasses.dataclass(kw_only=True)
class DataSpec:
    path: str = field(path=True, help="instances dataset to train on (prepare or select output)")
    seq_len: int = field(256, help="tokens per packed training sequence")
    fraction: float = field(1.0, help="train on a seeded random subset of this fraction")
    seed: int = field(0, help="seed of the subset and of the sequence order")


def cache_key(cfg_data: DataSpec, instances_fp: str, tokenizer_fp: str) -> str:
    key = json.dumps([instances_fp, tokenizer_fp, cfg_data.seq_len, cfg_data.fraction, cfg_data.seed])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def in_subset(ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """A seeded, order-independent subset: keep an id when its hash falls below `fraction`."""
    if fraction >= 1:
        return np.ones(len(ids), dtype=bool)
    h = [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "little")
         for i in ids]
    return np.array(h, dtype=np.float64) / 2.0**64 < fraction


def pack_part(batch: dict, tokenizer_path: str, seq_len: int, fraction: float, seed: int,
              output: str) -> dict:
    """CPU task: one instances part -> packed `seq_len` sequences (EOS after every document),
    shuffled with a seed; the partial last sequence is dropped and counted."""
    tok = load_tokenizer(tokenizer_path)
    stats = []
    for part, url in zip(batch["part"], batch["url"]):
        with fsspec.open(str(url), "rb") as f:
            table = pq.read_table(f, columns=["id", "text"])
        keep = in_subset(table["id"].to_pylist(), fraction, seed)
        texts = [t for t, k in zip(table["text"].to_pylist(), keep) if k]
        ids = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
        stream = np.fromiter((t for doc in ids for t in (*doc, tok.eos_token_id)), dtype=np.int32)
        n_seq = len(stream) // seq_len
        seqs = stream[: n_seq * seq_len].reshape(n_seq, seq_len)
        rng = np.random.default_rng([seed, int(hashlib.md5(str(part).encode()).hexdigest()[:8], 16)])
        seqs = seqs[rng.permutation(n_seq)]
        values = pa.array(seqs.reshape(-1))
        column = pa.FixedSizeListArray.from_arrays(values, seq_len)
        io.write_parquet(io.join(output, str(part)), pa.table({"input_ids": column}))
        stats.append(json.dumps({"part": str(part), "sequences": n_seq, "documents": len(texts),
                                 "tokens": int(len(stream)), "dropped_tokens": int(len(stream) - n_seq * seq_len)}))
    return {"stats": stats}


def build_token_cache(data: DataSpec, tokenizer_path: str, output: str) -> tuple[str, dict]:
    """Tokenise + pack an instances dataset once (skipped when already built)."""
    import ray

    instances = io.read_instances_manifest(data.path)
    key = cache_key(data, instances["fingerprint"], tokenizer_fingerprint(load_tokenizer(tokenizer_path)))
    root = io.join(output, "tokens", key)
    if io.exists(io.join(root, io.MANIFEST)):
        return root, io.read_json(io.join(root, io.MANIFEST))
    done = {p.rsplit("/", 1)[-1] for p in io.list_parts(root)}
    todo = [{"part": p["name"], "url": io.join(data.path, p["name"])}
            for p in instances["parts"] if p["name"] not in done]
    stats = {}
    if io.exists(io.join(root, "_stats.json")):
        stats = io.read_json(io.join(root, "_stats.json"))
    if todo:
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        ds = ds.map_batches(pack_part, fn_kwargs=dict(tokenizer_path=tokenizer_path, seq_len=data.seq_len,
                                                      fraction=data.fraction, seed=data.seed, output=root),
                            batch_size=1, num_cpus=0.5)
        for row in ds.iter_rows():
            s = json.loads(row["stats"])
            stats[s["part"]] = s
            io.write_json(io.join(root, "_stats.json"), stats)
    parts = [{"name": p["name"], "rows": stats[p["name"]]["sequences"]} for p in instances["parts"]]
    manifest = {"instances": data.path, "instances_fingerprint": instances["fingerprint"],
                "tokenizer": tokenizer_path, "seq_len": data.seq_len, "fraction": data.fraction,
                "seed": data.seed, "parts": parts,
                "sequences": sum(p["rows"] for p in parts),
                "documents": sum(s["documents"] for s in stats.values()),
                "tokens": sum(s["tokens"] for s in stats.values()),
                "dropped_tokens": sum(s["dropped_tokens"] for s in stats.values())}
    if manifest["sequences"] == 0:
        raise ValueError(f"data.path: {data.path} yields no {data.seq_len}-token sequence "
                         f"(fraction {data.fraction}); lower data.seq_len or add data")
    io.write_manifest(root, manifest)
    return root, manifest


def read_sequences(root: str, manifest: dict, limit: int | None = None) -> np.ndarray:
    """(N, seq_len) int64 token ids from a token cache (for held-out evaluation)."""
    out, n = [], 0
    for part in manifest["parts"]:
        if not part["rows"]:
            continue
        with fsspec.open(io.join(root, part["name"]), "rb") as f:
            col = pq.read_table(f)["input_ids"].combine_chunks()
        out.append(col.values.to_numpy().reshape(len(col), -1))
        n += len(col)
        if limit and n >= limit:
            break
    seqs = np.concatenate(out).astype(np.int64)
    return seqs[:limit] if limit else seqs
