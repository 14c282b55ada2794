"""The token cache: an instances dataset tokenised with a model's tokenizer and packed into
fixed-length sequences, written once by Ray Data tasks as Parquet parts that training reads.

Every document is packed as `[BOS] text EOS` (BOS only where the tokenizer has one), so a
model trained here sees each document start exactly as the score stage presents it
(`logprob.prefix_token_id`: BOS, or EOS where there is none). A cache depends only on its
content (instances, tokenizer, seq_len, subset), so every run that needs the same one shares
it; the order training reads it in is the sampler's business (`miniplm.data.sampler`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pyarrow as pa

from miniplm import console, io
from miniplm.config import field
from miniplm.data.encode import TextEncoder, text_encoder
from miniplm.models import load_tokenizer, tokenizer_fingerprint

PACKING = 2  # the packing format's version: a change makes every older cache a miss


@dataclasses.dataclass(kw_only=True)
class DataSpec:
    path: str = field(path=True, help="instances dataset to train on (prepare or select output)")
    seq_len: int = field(256, help="tokens per packed training sequence")
    fraction: float = field(1.0, help="train on a seeded random subset of this fraction")
    seed: int = field(0, help="seed of the subset (fraction < 1)")
    shuffle_window: int = field(8, help="token-cache parts mixed and shuffled together in each pass "
                                        "(memory: this many parts per worker)")

    def __post_init__(self):
        if self.shuffle_window < 1:
            raise ValueError(f"data.shuffle_window must be >= 1, got {self.shuffle_window}")


def cache_key(cfg_data: DataSpec, instances_fp: str, tokenizer_fp: str) -> str:
    """What the cache's content depends on, and nothing else (the subset seed only when there
    is a subset), so runs that differ in anything else share it."""
    subset = [cfg_data.fraction, cfg_data.seed] if cfg_data.fraction < 1 else None
    key = json.dumps([PACKING, instances_fp, tokenizer_fp, cfg_data.seq_len, subset])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def in_subset(keys: list[str], fraction: float, seed: int) -> np.ndarray:
    """A seeded, order-independent subset: keep a key (an id, a text) when its hash falls below
    `fraction`."""
    if fraction >= 1:
        return np.ones(len(keys), dtype=bool)
    return io.seeded_hashes(keys, seed).astype(np.float64) / 2.0**64 < fraction


def document_stream(token_ids: list[list[int]], bos: int | None, eos: int) -> np.ndarray:
    """Documents back to back as `[BOS] doc EOS`: one int32 token stream."""
    head = () if bos is None else (bos,)
    return np.fromiter((t for doc in token_ids for t in (*head, *doc, eos)), dtype=np.int32)


def pack_part(batch: dict, encoder: TextEncoder, seq_len: int, fraction: float, seed: int,
              output: str) -> dict:
    """CPU task: one instances part -> packed `seq_len` sequences in document order; the
    partial last sequence is dropped and counted. The part's stats travel in its own Parquet
    metadata, so a part and its stats become final together (a killed build loses neither)."""
    import ray

    node = ray.get_runtime_context().get_node_id()  # recorded in each part it packs
    names = []
    for part, url in zip(batch["part"], batch["url"]):
        table = io.read_part(str(url), ["id", "text"])
        keep = in_subset(table["id"].to_pylist(), fraction, seed)
        texts = [t for t, k in zip(table["text"].to_pylist(), keep) if k]
        stream = document_stream(encoder.encode(texts), encoder.bos_token_id, encoder.eos_token_id)
        n_seq = len(stream) // seq_len
        column = pa.FixedSizeListArray.from_arrays(pa.array(stream[: n_seq * seq_len]), seq_len)
        stats = {"part": str(part), "sequences": n_seq, "documents": len(texts),
                 "tokens": int(len(stream)), "dropped_tokens": int(len(stream) - n_seq * seq_len)}
        io.write_parquet(io.join(output, str(part)), pa.table({"input_ids": column}), metadata=stats, node=node)
        names.append(str(part))
    return {"part": names}


def build_token_cache(data: DataSpec, tokenizer_path: str, cache_root: str) -> tuple[str, dict]:
    """Tokenise + pack an instances dataset once into `cache_root/<key>` (reused when built;
    a killed build resumes with the parts it finished)."""
    instances = io.read_instances_manifest(data.path)
    key = cache_key(data, instances["fingerprint"], tokenizer_fingerprint(load_tokenizer(tokenizer_path)))
    root = io.join(cache_root, key)
    if io.exists(io.join(root, io.MANIFEST)):
        return root, io.read_json(io.join(root, io.MANIFEST))
    # a run that needs the cache while another builds it waits for that one, then reuses it
    with io.hold(root, "tokens", wait=True):
        if io.exists(io.join(root, io.MANIFEST)):
            return root, io.read_json(io.join(root, io.MANIFEST))
        return root, _build(data, instances, tokenizer_path, root)


def _build(data: DataSpec, instances: dict, tokenizer_path: str, root: str) -> dict:
    import ray

    io.clear_tmp(root)
    names = [io.plain_name(p["name"], f"{data.path}/{io.MANIFEST} part") for p in instances["parts"]]
    done = {p.rsplit("/", 1)[-1] for p in io.list_parts(root)}
    todo = [{"part": name, "url": io.join(data.path, name)} for name in names if name not in done]
    if todo:
        console.detail(f"tokens: packing {len(todo)} of {len(instances['parts'])} parts -> {root}")
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        ds = ds.map_batches(pack_part, fn_kwargs=dict(encoder=text_encoder(tokenizer_path), seq_len=data.seq_len,
                                                      fraction=data.fraction, seed=data.seed, output=root),
                            batch_size=1, num_cpus=0.5)
        for _ in ds.iter_rows():
            pass
    stats = [io.read_parquet_metadata(io.join(root, name)) for name in names]
    parts = [{"name": s["part"], "rows": s["sequences"]} for s in stats]
    manifest = {"instances": data.path, "instances_fingerprint": instances["fingerprint"],
                "tokenizer": tokenizer_path, "seq_len": data.seq_len, "fraction": data.fraction,
                "seed": data.seed if data.fraction < 1 else None, "packing": PACKING, "parts": parts,
                "sequences": sum(p["rows"] for p in parts),
                "documents": sum(s["documents"] for s in stats),
                "tokens": sum(s["tokens"] for s in stats),
                "dropped_tokens": sum(s["dropped_tokens"] for s in stats)}
    if manifest["sequences"] == 0:
        raise ValueError(f"data.path: {data.path} yields no {data.seq_len}-token sequence "
                         f"(fraction {data.fraction}); lower data.seq_len or add data")
    io.write_manifest(root, manifest)
    return manifest


def part_sequences(root: str, name: str) -> np.ndarray:
    """(rows, seq_len) int32 token ids of one cache part."""
    col = io.read_part(io.join(root, name), ["input_ids"])["input_ids"].combine_chunks()
    return col.values.to_numpy().reshape(len(col), -1)


def read_sequences(root: str, manifest: dict, limit: int | None = None) -> np.ndarray:
    """(N, seq_len) int64 token ids from a token cache, for held-out evaluation: every sequence,
    or `limit` of them spread evenly over the whole cache (its first rows would all come from
    one document or one source). Reads one part at a time."""
    total = sum(p["rows"] for p in manifest["parts"])
    take = np.arange(total)
    if limit and limit < total:
        take = np.unique(np.linspace(0, total - 1, limit).round().astype(np.int64))
    out, start = [], 0
    for part in manifest["parts"]:
        inside = take[(take >= start) & (take < start + part["rows"])] - start
        if len(inside):
            out.append(part_sequences(root, part["name"])[inside])
        start += part["rows"]
    return np.concatenate(out).astype(np.int64)
