"""select: instances + teacher and reference score tables -> refined corpus (Difference Sampling).

Score tables have one part per instances part, under the same name, so everything runs part
by part on Ray and no process holds the corpus:

1. rank: one task per part reads that part's instance ids (+ n_bytes, source) and both tables'
   part, refuses ids that are missing, unknown or duplicated and non-finite scores, and returns
   one float64 ranking key per row (+ the score for `sample`, teacher tokens for a token budget).
2. choose: the driver holds only those arrays, in part order (8-20 bytes per instance; a row's
   position gives its part and row), and finds the exact top `floor(alpha * N)` by key, ties
   broken by id: only the tie group straddling the cut has its ids fetched, by small tasks.
3. write: one task per part writes the refined part (instances format + `score`) and returns
   the part's report statistics, fingerprint state, sample candidates and plot points.

Beside the corpus: `report.json`, `scores.png` and `samples.md`, the view people use to
sanity-check a selection.

Methods (`score` is what is ranked; higher is kept):
  difference  log p(x)/|x| - log p_ref(x)/|x|   (the paper's Difference Sampling)
  teacher     log p(x)/|x|                       (perplexity-filter baseline)
  random      a uniform draw per id               (vanilla baseline at the same size)
  sample      difference score, sampled without replacement with probability ~ exp(score/T)
              (Gumbel top-k): a softer selection that keeps more diversity
`random` and `sample` draw from a hash of `seed:id`, so an instance's draw does not depend on
its part or position. `|x|` is the token count (`--normalize token`, teacher and reference must
share a tokenizer) or the UTF-8 byte count (`--normalize byte`, comparable across tokenizers);
`auto` picks by the tables' tokenizers.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import time
from fractions import Fraction
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from miniplm import __version__, console, io
from miniplm.cluster import check_paths_visible
from miniplm.config import describe, field, to_dict
from miniplm.data.prepare import INSTANCE_SCHEMA
from miniplm.runtime import map_parts
from miniplm.selection.report import (SAMPLES, build_report, pick_samples, report_summary, samples_markdown,
                                   write_report_files)

METHODS = ("difference", "teacher", "random", "sample")
REFINED_SCHEMA = INSTANCE_SCHEMA.append(pa.field("score", pa.float64()))
EXCERPT = 300  # characters of text shown per sample
PLOT_POINTS = 20_000  # instances in the teacher-vs-reference scatter


@dataclasses.dataclass(kw_only=True, frozen=True)
class SelectConfig:
    instances: str = field(path=True, help="instances dataset the tables were scored on")
    teacher: str = field(path=True, help="teacher score table folder")
    reference: str | None = field(None, path=True, help="reference score table folder (difference, sample)")
    output: str = field(path=True, help="folder for the refined corpus and its report")
    alpha: float = field(0.5, help="fraction of instances to keep, in (0, 1] (floor(alpha * N))")
    budget_tokens: int | None = field(None, help="instead of alpha: keep the best instances up to "
                                                 "this many teacher tokens")
    method: str = field("difference", help="difference, teacher, random or sample")
    normalize: str = field("auto", help="token (per-token log-likelihoods: teacher and reference must share a "
                                        "tokenizer), byte (per UTF-8 byte: any tokenizers), or auto (token when "
                                        "the tables' tokenizers match, else byte; said which)")
    temperature: float = field(1.0, help="sample method: softmax temperature over scores")
    seed: int = field(0, help="random and sample methods: the random seed")
    dry_run: bool = field(False, help="print the selection summary, write nothing")
    overwrite: bool = field(False, help="replace an output folder made with other settings")

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.normalize not in ("auto", "token", "byte"):
            raise ValueError(f"normalize must be auto, token or byte, got {self.normalize!r}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1] (the fraction of instances kept), got {self.alpha}")
        if self.budget_tokens is not None and self.budget_tokens < 0:
            raise ValueError(f"budget_tokens must be >= 0, got {self.budget_tokens}")
        if self.method in ("difference", "sample") and not self.reference:
            raise ValueError(f"reference: method {self.method!r} needs a reference score table")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @property
    def uses_reference(self) -> bool:
        return self.method in ("difference", "sample")



def keep_count(alpha: float, n: int) -> int:
    """floor(alpha * n), exactly: alpha as the decimal it was written as (0.282 is 282/1000,
    not the nearest double), so no float rounding drops an instance at 10^8 rows."""
    return math.floor(Fraction(str(alpha)) * n)


# ---------------------------------------------------------------- the score tables (driver)


def read_score_manifest(root: str, role: str, instances: dict) -> dict:
    """A finished score table's manifest, checked against the instances it must cover."""
    url = io.join(root, io.MANIFEST)
    if not io.exists(url):
        raise FileNotFoundError(f"{role} table {root}: no {io.MANIFEST} (scoring unfinished, or "
                                "not a score table)")
    manifest = io.read_json(url)
    provenance = manifest.get("provenance", {})
    if provenance.get("instances_fingerprint") != instances["fingerprint"]:
        raise ValueError(f"{role} table {root} was scored on other instances: its instances "
                         f"fingerprint is {provenance.get('instances_fingerprint')}, the instances' "
                         f"is {instances['fingerprint']}")
    ours, theirs = [p["name"] for p in manifest["parts"]], [p["name"] for p in instances["parts"]]
    if sorted(ours) != sorted(theirs):
        differ = sorted(set(ours) ^ set(theirs))
        raise ValueError(f"{role} table {root}: its parts are not the instances' parts "
                         f"({len(differ)} differ, e.g. {differ[0]!r})")
    return manifest


def table_identity(manifest: dict) -> dict:
    """What a score table is, for deciding whether a refined corpus made from it is still
    valid: its provenance (model, tokenizer and instances fingerprints, max_length, stride,
    dtype, ...) without paths and version, plus its totals as a checksum of the content."""
    provenance = {k: v for k, v in manifest.get("provenance", {}).items()
                  if k not in ("model", "instances", "version")}
    return {**provenance, **{k: manifest.get(k) for k in ("rows", "tokens", "logprob")}}


def select_job(cfg: SelectConfig, instances_fp: str, t_manifest: dict, r_manifest: dict | None) -> dict:
    """The reuse key: an output made for the same job is complete, any other is refused."""
    settings = {k: v for k, v in to_dict(cfg).items()
                if k not in ("instances", "teacher", "reference", "output", "dry_run", "overwrite")}
    return {"stage": "select", "instances_fingerprint": instances_fp,
            "teacher": table_identity(t_manifest),
            "reference": table_identity(r_manifest) if r_manifest else None, **settings}


def resolve_normalize(cfg: SelectConfig, t_manifest: dict, r_manifest: dict | None) -> SelectConfig:
    """`auto` made concrete: per token where the tables' tokenizers match (or there is no
    reference), per byte where they differ (a Qwen teacher, a Llama-tokenized reference)."""
    if cfg.normalize != "auto":
        return cfg
    same = r_manifest is None or (t_manifest["provenance"].get("tokenizer_fingerprint")
                                  == r_manifest["provenance"].get("tokenizer_fingerprint"))
    unit = "token" if same else "byte"
    say = console.detail if same else print  # a change of unit is news; the usual case is not
    say(f"select: normalize auto -> per {unit} (" + ("one tokenizer" if same else
        "teacher and reference use different tokenizers") + ")")
    return dataclasses.replace(cfg, normalize=unit)


def check_tokenizers(t_manifest: dict, r_manifest: dict, normalize: str) -> None:
    t_tok = t_manifest["provenance"].get("tokenizer_fingerprint")
    r_tok = r_manifest["provenance"].get("tokenizer_fingerprint")
    if normalize == "token" and t_tok != r_tok:
        raise ValueError("teacher and reference use different tokenizers (fingerprints "
                         f"{t_tok} vs {r_tok}): per-token log-likelihoods are not comparable. "
                         "Use --normalize byte.")


# ---------------------------------------------------------------- one part (in a Ray task)


# what makes a score table one model's: every part must agree with the table's manifest on these
PART_PROVENANCE = ("model_fingerprint", "tokenizer_fingerprint", "instances_fingerprint", "max_length",
                   "stride", "dtype")


def check_part_provenance(table: pa.Table, root: str, name: str, role: str) -> None:
    """Refuse a part scored by another run than the one the manifest describes (a table that
    two models wrote into would otherwise pass as one)."""
    part = io.provenance_of(table.schema)
    manifest = io.join(root, io.MANIFEST)
    table_prov = _table_provenance(manifest, tuple(io.file_version(manifest)))
    differ = [k for k in PART_PROVENANCE if part.get(k) != table_prov.get(k)]
    if differ:
        raise ValueError(f"{role} table {root}: part {name} was scored with other settings than the table's "
                         f"manifest ({', '.join(differ)} differ): re-score it with --overwrite")


@functools.lru_cache(maxsize=8)
def _table_provenance(manifest: str, version: tuple) -> dict:
    """A table manifest's provenance, read once per worker process and manifest version (it
    lists every part: re-reading it for each part would be quadratic in the parts)."""
    return io.read_json(manifest).get("provenance", {})


def check_unique(table: pa.Table, what: str) -> None:
    n_unique = pc.count_distinct(table["id"]).as_py()
    if n_unique != table.num_rows:
        counts = pc.value_counts(table["id"])
        dup = next(c["values"] for c in counts.to_pylist() if c["counts"] > 1)
        raise ValueError(f"{what}: {table.num_rows - n_unique} duplicate ids (e.g. {dup!r})")


def check_finite(table: pa.Table, what: str) -> None:
    logprob = table["logprob"].to_numpy()
    bad = np.flatnonzero(~np.isfinite(logprob))
    if len(bad):
        raise ValueError(f"{what}: non-finite logprob {logprob[bad[0]]} for id "
                         f"{table['id'][int(bad[0])].as_py()!r} ({len(bad)} rows)")


def align(ids: pa.ChunkedArray, table: pa.Table, what: str, role: str, part: str) -> pa.Table:
    """`table`'s rows in the order of the instance ids `ids`, refused unless it holds each of
    them exactly once. (Instance ids are unique: then as many rows as ids, every id found,
    means no duplicate and no unknown id.)"""
    if table.num_rows == len(ids) and table["id"].equals(ids):
        return table
    position = pc.index_in(ids, value_set=table["id"].combine_chunks())
    if table.num_rows == len(ids) and not position.null_count:
        return table.take(position)
    check_unique(table, what)
    unknown = pc.invert(pc.is_in(table["id"], value_set=ids.combine_chunks()))
    n_unknown = pc.sum(unknown).as_py() or 0
    missing = ids.filter(pc.is_null(position))
    example = missing[0] if len(missing) else table["id"].filter(unknown)[0]
    raise ValueError(f"{role} table does not cover the instances: {len(missing)} instance ids "
                     f"missing, {n_unknown} unknown ids in part {part} (e.g. {example.as_py()!r})")


def read_joined_part(cfg: SelectConfig, name: str, columns: list[str]) -> pa.Table:
    """One instances part's `columns` + t_tokens, t_logprob (+ r_tokens, r_logprob), row for
    row; refuses a table part that does not hold each instance exactly once, finitely."""
    instances = io.read_part(io.join(cfg.instances, name), columns)
    roles = [("teacher", cfg.teacher, "t")] + ([("reference", cfg.reference, "r")] if cfg.uses_reference else [])
    for role, root, prefix in roles:
        table = io.read_part(io.join(root, name), ["id", "n_tokens", "logprob"])
        check_part_provenance(table, root, name, role)
        table = align(instances["id"], table, f"{role} table {root}", role, name)
        check_finite(table, f"{role} table {root}")
        instances = instances.append_column(f"{prefix}_tokens", table["n_tokens"])
        instances = instances.append_column(f"{prefix}_logprob", table["logprob"])
    return instances


def per_unit(logprob: np.ndarray, tokens: np.ndarray, n_bytes: np.ndarray, normalize: str,
             ids: pa.ChunkedArray, role: str) -> np.ndarray:
    denom = n_bytes if normalize == "byte" else tokens
    zero = np.flatnonzero(denom == 0)
    if len(zero):
        raise ValueError(f"{role}: instance {ids[int(zero[0])].as_py()!r} has 0 "
                         f"{'bytes' if normalize == 'byte' else 'tokens'}; cannot normalise")
    return logprob / denom


def id_uniforms(ids: list[str], seed: int) -> np.ndarray:
    """One uniform draw in (0, 1) per id, from its seeded hash: the same whatever part or
    position the id has. 52 bits, so u and 1 - u are never 0."""
    bits = io.seeded_hashes(ids, seed) >> np.uint64(12)
    return (bits.astype(np.float64) + 0.5) / 2.0**52


def selection_scores(table: pa.Table, cfg: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
    """(score, ranking key) per row of a joined part. The key equals the score except for
    `sample`, where Gumbel noise turns top-k into sampling without replacement."""
    n_bytes = table["n_bytes"].to_numpy()
    if cfg.method == "random":
        draw = id_uniforms(table["id"].to_pylist(), cfg.seed)
        return draw, draw
    t = per_unit(table["t_logprob"].to_numpy(), table["t_tokens"].to_numpy(), n_bytes,
                 cfg.normalize, table["id"], "teacher")
    if cfg.method == "teacher":
        return t, t
    r = per_unit(table["r_logprob"].to_numpy(), table["r_tokens"].to_numpy(), n_bytes,
                 cfg.normalize, table["id"], "reference")
    score = t - r
    if cfg.method == "difference":
        return score, score
    gumbel = -np.log(-np.log(id_uniforms(table["id"].to_pylist(), cfg.seed)))
    return score, score / cfg.temperature + gumbel


def rank_part(cfg: SelectConfig, name: str, with_tokens: bool) -> dict:
    """Task of the rank wave: the ranking key of every row of one part, in row order (plus the
    score when it differs from the key, and teacher tokens for a token budget)."""
    table = read_joined_part(cfg, name, ["id", "n_bytes", "source"])
    score, key = selection_scores(table, cfg)
    out = {"key": key, "score": score if cfg.method == "sample" else None, "tokens": None}
    if with_tokens:
        tokens = table["t_tokens"].to_numpy()
        if len(tokens) and tokens.max() >= 2**31:
            raise ValueError(f"part {name}: an instance of {tokens.max()} tokens")
        out["tokens"] = tokens.astype(np.int32)
    return out


def part_ids(root: str, name: str, rows: np.ndarray) -> list[str]:
    """Task: the ids at `rows` of one instances part (for ordering a tie group by id)."""
    return io.read_part(io.join(root, name), ["id"])["id"].take(pa.array(rows)).to_pylist()


def write_part(cfg: SelectConfig, name: str, kept_rows: np.ndarray, threshold: float,
               plot_rows: np.ndarray, write: bool) -> dict:
    """Task of the write wave: the refined part (kept rows + score, sorted by id) and what the
    report needs of this part."""
    table = read_joined_part(cfg, name, INSTANCE_SCHEMA.names)
    score, _ = selection_scores(table, cfg)
    kept = np.zeros(table.num_rows, dtype=bool)
    kept[kept_rows] = True
    out = {"part": None, "hash": None, "stats": part_statistics(table, score, kept),
           "samples": sample_candidates(table, score, kept, threshold, cfg),
           "plot": plot_points(table, kept, plot_rows, cfg) if cfg.uses_reference else None}
    if not kept.any():
        return out
    refined = table.select(INSTANCE_SCHEMA.names).append_column("score", pa.array(score))
    refined = refined.filter(pa.array(kept)).sort_by("id").cast(REFINED_SCHEMA)
    if write:
        io.write_parquet(io.join(cfg.output, name), refined)
        fingerprint = io.RowSetHash()
        for id_, text in zip(refined["id"].to_pylist(), refined["text"].to_pylist()):
            fingerprint.add(id_, text)
        out["hash"] = fingerprint.state()
    out["part"] = {"name": name, "rows": refined.num_rows, "bytes": pc.sum(refined["n_bytes"]).as_py()}
    return out


def part_statistics(table: pa.Table, score: np.ndarray, kept: np.ndarray) -> dict:
    """Per-source counts and sums of one part (they add up across parts)."""
    tokens = table["t_tokens"].to_numpy()
    sources = pc.dictionary_encode(table["source"].combine_chunks())
    code, n = sources.indices.to_numpy(), len(sources.dictionary)
    rows, kept_rows = np.bincount(code, minlength=n), np.bincount(code[kept], minlength=n)
    tokens_kept = np.bincount(code[kept], weights=tokens[kept], minlength=n)
    score_sum = np.bincount(code, weights=score, minlength=n)
    per_source = {source: {"kept": int(kept_rows[i]), "dropped": int(rows[i] - kept_rows[i]),
                           "tokens_kept": int(tokens_kept[i]), "score_sum": float(score_sum[i])}
                  for i, source in enumerate(sources.dictionary.to_pylist())}
    return {"tokens_total": int(tokens.sum()), "tokens_kept": int(tokens[kept].sum()),
            "per_source": per_source}


def ranked(rows: np.ndarray, score: np.ndarray, ids: pa.ChunkedArray) -> np.ndarray:
    """`rows` in report order: score descending, ties by id."""
    row_ids = ids.take(pa.array(rows, pa.int64())).to_numpy(zero_copy_only=False)
    return rows[np.lexsort((row_ids, -score[rows]))]


def first_ranked(rows: np.ndarray, score: np.ndarray, ids: pa.ChunkedArray, k: int) -> np.ndarray:
    """The k first of `rows` in report order, sorting only the rows that can be among them."""
    if len(rows) > k:
        cut = np.partition(score[rows], len(rows) - k)[len(rows) - k]
        rows = rows[score[rows] >= cut]
    return ranked(rows, score, ids)[:k]


def last_ranked(rows: np.ndarray, score: np.ndarray, ids: pa.ChunkedArray, k: int) -> np.ndarray:
    if len(rows) > k:
        cut = np.partition(score[rows], k - 1)[k - 1]
        rows = rows[score[rows] <= cut]
    return ranked(rows, score, ids)[-k:]


def sample_candidates(table: pa.Table, score: np.ndarray, kept: np.ndarray, threshold: float,
                      cfg: SelectConfig) -> list[dict]:
    """The rows of this part that can be among samples.md's: its highest and lowest, and its
    last above and first below the threshold. Any global sample is one of some part's."""
    ids = table["id"]
    rows = np.arange(table.num_rows)
    above = score >= threshold
    picked = np.unique(np.concatenate([
        first_ranked(rows, score, ids, SAMPLES), last_ranked(rows, score, ids, SAMPLES),
        last_ranked(rows[above], score, ids, SAMPLES // 2),
        first_ranked(rows[~above], score, ids, SAMPLES // 2)]))
    columns = ["id", "source", "n_bytes", "t_tokens", "t_logprob"]
    columns += ["r_tokens", "r_logprob"] if cfg.uses_reference else []
    out = table.select(columns).take(pa.array(picked, pa.int64())).to_pylist()
    texts = table["text"].take(pa.array(picked, pa.int64())).to_pylist()
    for row, k, text in zip(out, picked, texts):
        row.update(score=float(score[k]), kept=bool(kept[k]), text=excerpt(text))
    return out


def excerpt(text: str, width: int = EXCERPT) -> str:
    text = " ".join(text.split())
    return text[:width] + " …" if len(text) > width else text


def plot_points(table: pa.Table, kept: np.ndarray, rows: np.ndarray, cfg: SelectConfig) -> dict:
    """Teacher and reference log-likelihood per unit at `rows`, and their ranges over the part."""
    n_bytes = table["n_bytes"].to_numpy()
    t = table["t_logprob"].to_numpy() / (n_bytes if cfg.normalize == "byte" else table["t_tokens"].to_numpy())
    r = table["r_logprob"].to_numpy() / (n_bytes if cfg.normalize == "byte" else table["r_tokens"].to_numpy())
    lo, hi = (float(min(t.min(), r.min())), float(max(t.max(), r.max()))) if len(t) else (math.inf, -math.inf)
    return {"t": t[rows], "r": r[rows], "kept": kept[rows], "lo": lo, "hi": hi}


# ---------------------------------------------------------------- Ray wiring (driver)


@dataclasses.dataclass
class Ranking:
    """What the driver holds: per instance, in part order (offsets[k] is part k's first)."""
    names: list[str]
    offsets: np.ndarray  # (P + 1,) int64
    key: np.ndarray  # (N,) float64
    score: np.ndarray  # (N,) float64, the key itself except for `sample`
    tokens: np.ndarray | None  # (N,) int32 teacher tokens, with a token budget only

    def part_rows(self, k: int, mask: np.ndarray) -> np.ndarray:
        return np.flatnonzero(mask[self.offsets[k]:self.offsets[k + 1]]).astype(np.int32)


def rank_parts(cfg: SelectConfig, parts: list[dict]) -> Ranking:
    """The rank wave: every part's keys, copied into preallocated arrays as tasks finish."""
    names = [io.plain_name(p["name"], f"{cfg.instances}/{io.MANIFEST} part") for p in parts]
    offsets = np.concatenate([[0], np.cumsum([p["rows"] for p in parts])]).astype(np.int64)
    n = int(offsets[-1])
    budget = cfg.budget_tokens is not None
    key = np.empty(n)
    score = np.empty(n) if cfg.method == "sample" else key
    tokens = np.empty(n, dtype=np.int32) if budget else None
    calls = [(cfg, name, budget) for name in names]
    for k, result in map_parts(rank_part, calls, "select: ranking"):
        lo, hi = offsets[k], offsets[k + 1]
        if len(result["key"]) != hi - lo:
            raise ValueError(f"instances part {names[k]} has {len(result['key'])} rows, its "
                             f"manifest says {hi - lo}")
        key[lo:hi] = result["key"]
        if result["score"] is not None:
            score[lo:hi] = result["score"]
        if budget:
            tokens[lo:hi] = result["tokens"]
    return Ranking(names=names, offsets=offsets, key=key, score=score, tokens=tokens)


def ids_at(cfg: SelectConfig, ranking: Ranking, positions: np.ndarray) -> np.ndarray:
    """The ids of instances at global `positions` (a tie group: few), read by small tasks."""
    part = np.searchsorted(ranking.offsets, positions, side="right") - 1
    ids = np.empty(len(positions), dtype=object)
    groups = [np.flatnonzero(part == k) for k in np.unique(part)]
    calls = [(cfg.instances, ranking.names[part[g[0]]], positions[g] - ranking.offsets[part[g[0]]])
             for g in groups]
    for i, result in map_parts(part_ids, calls, "select: ids of ties", num_cpus=0.5):
        ids[groups[i]] = result
    return ids


def top_count(key: np.ndarray, n_keep: int, ids_of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Mask of the n_keep largest keys, ties at the cut broken by smaller id first."""
    keep = np.zeros(len(key), dtype=bool)
    if n_keep <= 0:
        return keep
    if n_keep >= len(key):
        return ~keep
    cut = np.partition(key, len(key) - n_keep)[len(key) - n_keep]  # the n_keep-th largest key
    np.greater(key, cut, out=keep)
    ties = np.flatnonzero(key == cut)
    need = n_keep - int(keep.sum())
    if need < len(ties):
        ties = ties[np.argsort(ids_of(ties), kind="stable")]
    keep[ties[:need]] = True
    return keep


def top_within_budget(key: np.ndarray, tokens: np.ndarray, budget: int,
                      ids_of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Mask of the longest prefix of the ranking (key descending, ties by id) whose tokens
    fit in `budget`; only the tie group at the cut is ordered by id."""
    n = len(key)
    order = np.argsort(-key, kind="stable")
    total = tokens[order].astype(np.int64)
    np.cumsum(total, out=total)
    n_keep = int(np.searchsorted(total, budget, side="right"))
    if n_keep < n:
        cut = key[order[n_keep]]
        start = bisect.bisect_left(range(n), True, key=lambda i: key[order[i]] <= cut)
        stop = bisect.bisect_left(range(n), True, key=lambda i: key[order[i]] < cut)
        if stop - start > 1:
            group = order[start:stop]
            group = group[np.argsort(ids_of(group), kind="stable")]
            before = total[start - 1] if start else 0
            n_keep = start + int(np.searchsorted(before + np.cumsum(tokens[group], dtype=np.int64),
                                                 budget, side="right"))
            order[start:stop] = group
    keep = np.zeros(n, dtype=bool)
    keep[order[:n_keep]] = True
    return keep


def choose(ranking: Ranking, cfg: SelectConfig) -> np.ndarray:
    """Mask of kept instances: the top floor(alpha*N) by key (ties: smaller id first), or
    with a token budget the best instances whose tokens fit in it."""
    def ids_of(positions):
        return ids_at(cfg, ranking, positions)

    if cfg.budget_tokens is not None:
        return top_within_budget(ranking.key, ranking.tokens, cfg.budget_tokens, ids_of)
    return top_count(ranking.key, keep_count(cfg.alpha, len(ranking.key)), ids_of)


def plot_sample(n: int) -> np.ndarray:
    """Positions of the instances drawn in the scatter plot (a seeded draw, sorted)."""
    return np.sort(np.random.default_rng(0).choice(n, size=min(n, PLOT_POINTS), replace=False))


def write_parts(cfg: SelectConfig, ranking: Ranking, keep: np.ndarray, threshold: float) -> list[dict]:
    """The write wave; each part's result, in part order."""
    plot = plot_sample(len(keep))
    plot_part = np.searchsorted(ranking.offsets, plot, side="right") - 1
    calls = [(cfg, name, ranking.part_rows(k, keep), threshold,
              (plot[plot_part == k] - ranking.offsets[k]).astype(np.int32), not cfg.dry_run)
             for k, name in enumerate(ranking.names)]
    results = [None] * len(calls)
    for k, result in map_parts(write_part, calls, "select: writing"):
        results[k] = result
    return results


# ---------------------------------------------------------------- the stage


def run_select(cfg: SelectConfig) -> dict:
    """Run the select stage; returns its manifest (or, with dry_run, the report)."""
    from miniplm.io import read_instances_manifest

    console.detail(describe(cfg))
    started = time.time()
    inst_manifest = read_instances_manifest(cfg.instances)
    fp = inst_manifest["fingerprint"]
    t_manifest = read_score_manifest(cfg.teacher, "teacher", inst_manifest)
    r_manifest = None
    if cfg.uses_reference:
        r_manifest = read_score_manifest(cfg.reference, "reference", inst_manifest)
    cfg = resolve_normalize(cfg, t_manifest, r_manifest)
    if r_manifest:
        check_tokenizers(t_manifest, r_manifest, cfg.normalize)

    if cfg.dry_run:  # writes nothing: no output to hold
        return _select_into(cfg, inst_manifest, t_manifest, r_manifest, started)
    job = select_job(cfg, fp, t_manifest, r_manifest)
    with io.claim_output(cfg.output, job, overwrite=cfg.overwrite, what="a refined corpus",
                         inputs=[cfg.instances, cfg.teacher, cfg.reference]) as finished:
        if finished:
            manifest = io.read_json(io.join(cfg.output, io.MANIFEST))
            print(f"select: {cfg.output} is already complete ({manifest['instances']} kept); nothing to do")
            return manifest
        return _select_into(cfg, inst_manifest, t_manifest, r_manifest, started)


def _select_into(cfg: SelectConfig, inst_manifest: dict, t_manifest: dict, r_manifest: dict | None,
                 started: float) -> dict:
    """Rank, choose and (unless dry_run) write the refined corpus with its report."""
    from miniplm.runtime import init_ray

    fp = inst_manifest["fingerprint"]
    init_ray()
    # on several nodes: every one must see the local tables its tasks read and the output
    check_paths_visible({"--instances": cfg.instances, "--teacher": cfg.teacher, "--reference": cfg.reference},
                        {} if cfg.dry_run else {"--output": cfg.output})
    ranking = rank_parts(cfg, inst_manifest["parts"])
    keep = choose(ranking, cfg)
    threshold = float(np.min(ranking.score, where=keep, initial=math.inf))
    results = write_parts(cfg, ranking, keep, threshold)
    report = build_report(ranking.score, results, cfg, threshold)
    candidates = [row for r in results for row in r["samples"]]
    samples = samples_markdown(candidates, pick_samples(candidates, threshold), cfg, threshold)
    if cfg.dry_run:
        print(report_summary(report), flush=True)
        print(samples)
        return report
    console.detail(report_summary(report))

    write_report_files(cfg.output, ranking.score, results, report, samples, threshold, cfg)
    out_parts = [r["part"] for r in results if r["part"]]
    fingerprint = io.RowSetHash()
    for r in results:
        if r["hash"]:
            fingerprint.merge(io.RowSetHash.from_state(r["hash"]))
    kept_rows = sum(p["rows"] for p in out_parts)
    manifest = {
        "stage": "select", "version": __version__, "config": to_dict(cfg),
        "inputs": {"instances": {"path": cfg.instances, "fingerprint": fp},
                   "teacher": {"path": cfg.teacher, **_table_info(t_manifest)},
                   "reference": {"path": cfg.reference, **_table_info(r_manifest)} if r_manifest else None},
        "method": cfg.method, "normalize": cfg.normalize, "alpha": cfg.alpha,
        "budget_tokens": cfg.budget_tokens, "threshold": threshold,
        "candidates": len(keep), "instances": kept_rows,
        "tokens_kept": report["tokens_kept"], "bytes": sum(p["bytes"] for p in out_parts),
        "fingerprint": fingerprint.hexdigest(), "parts": out_parts,
        "seconds": round(time.time() - started, 2),
    }
    io.write_manifest(cfg.output, manifest)
    print(f"select ({report['method']}, per-{report['normalize']}): kept {kept_rows} of {len(keep)} instances, "
          f"{report['tokens_kept']:,} of {report['tokens_total']:,} teacher tokens, threshold score "
          f"{threshold:.4f} -> {cfg.output}", flush=True)
    return manifest


def _table_info(manifest: dict) -> dict:
    prov = manifest["provenance"]
    return {"model": prov.get("model"), "model_fingerprint": prov.get("model_fingerprint"),
            "tokenizer_fingerprint": prov.get("tokenizer_fingerprint")}
