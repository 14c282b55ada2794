"""select: instances + teacher and reference score tables -> refined corpus (Difference Sampling).

Only `id`, token/byte counts and scores are held in memory to find what to keep (10^8 rows
of id + floats is a few GB); the text is then streamed part by part through a filter. The
refined corpus has the instances format plus a `score` column, so every later stage reads it
like any instances dataset. Beside it: `report.json`, `scores.png` and `samples.md`, the view
people use to sanity-check a selection.

Methods (`score` is what is ranked; higher is kept):
  difference  log p(x)/|x| - log p_ref(x)/|x|   (the paper's Difference Sampling)
  teacher     log p(x)/|x|                       (perplexity-filter baseline)
  random      a seeded uniform draw               (vanilla baseline at the same size)
  sample      difference score, sampled without replacement with probability ~ exp(score/T)
              (Gumbel top-k): a softer selection that keeps more diversity
`|x|` is the token count (`--normalize token`, teacher and reference must share a tokenizer)
or the UTF-8 byte count (`--normalize byte`, comparable across tokenizers).
"""

from __future__ import annotations

import dataclasses
import math
import time
from fractions import Fraction

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from miniplm import __version__, io
from miniplm.config import describe, field, to_dict
from miniplm.prepare import INSTANCE_SCHEMA

METHODS = ("difference", "teacher", "random", "sample")
REFINED_SCHEMA = INSTANCE_SCHEMA.append(pa.field("score", pa.float64()))


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
    normalize: str = field("token", help="per-token (same tokenizer) or per-byte log-likelihoods")
    temperature: float = field(1.0, help="sample method: softmax temperature over scores")
    seed: int = field(0, help="random and sample methods: the random seed")
    dry_run: bool = field(False, help="print the selection summary, write nothing")
    overwrite: bool = field(False, help="replace an output folder made with other settings")

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.normalize not in ("token", "byte"):
            raise ValueError(f"normalize must be token or byte, got {self.normalize!r}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1] (the fraction of instances kept), got {self.alpha}")
        if self.budget_tokens is not None and self.budget_tokens < 0:
            raise ValueError(f"budget_tokens must be >= 0, got {self.budget_tokens}")
        if self.method in ("difference", "sample") and not self.reference:
            raise ValueError(f"reference: method {self.method!r} needs a reference score table")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def keep_count(alpha: float, n: int) -> int:
    """floor(alpha * n), exactly: alpha as the decimal it was written as (0.282 is 282/1000,
    not the nearest double), so no float rounding drops an instance at 10^8 rows."""
    return math.floor(Fraction(str(alpha)) * n)


# ---------------------------------------------------------------- loading and checks


def read_columns(root: str, parts: list[dict], columns: list[str], with_part: bool = False) -> pa.Table:
    """The columns of every part; `with_part` adds `_part`, the part's index, so the text
    pass can filter each part against only its own kept ids."""
    tables = []
    for k, part in enumerate(parts):
        with fsspec.open(io.join(root, part["name"]), "rb") as f:
            table = pq.read_table(f, columns=columns)
        if with_part:
            table = table.append_column("_part", pa.array(np.full(table.num_rows, k, dtype=np.int32)))
        tables.append(table)
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables(tables)


def load_score_table(root: str, role: str, instances_fp: str) -> tuple[pa.Table, dict]:
    """A finished score table's `id, n_tokens, logprob`, checked against the instances."""
    url = io.join(root, io.MANIFEST)
    if not io.exists(url):
        raise FileNotFoundError(f"{role} table {root}: no {io.MANIFEST} (scoring unfinished, or "
                                "not a score table)")
    manifest = io.read_json(url)
    provenance = manifest.get("provenance", {})
    if provenance.get("instances_fingerprint") != instances_fp:
        raise ValueError(f"{role} table {root} was scored on other instances: its instances "
                         f"fingerprint is {provenance.get('instances_fingerprint')}, the instances' "
                         f"is {instances_fp}")
    table = read_columns(root, manifest["parts"], ["id", "n_tokens", "logprob"])
    check_unique_finite(table, f"{role} table {root}")
    return table, manifest


def check_unique_finite(table: pa.Table, what: str) -> None:
    n_unique = pc.count_distinct(table["id"]).as_py()
    if n_unique != table.num_rows:
        counts = pc.value_counts(table["id"])
        dup = next(c["values"] for c in counts.to_pylist() if c["counts"] > 1)
        raise ValueError(f"{what}: {table.num_rows - n_unique} duplicate ids (e.g. {dup!r})")
    logprob = table["logprob"].to_numpy()
    bad = np.flatnonzero(~np.isfinite(logprob))
    if len(bad):
        raise ValueError(f"{what}: non-finite logprob {logprob[bad[0]]} for id "
                         f"{table['id'][int(bad[0])].as_py()!r} ({len(bad)} rows)")


def join_scores(instances: pa.Table, teacher: pa.Table, reference: pa.Table | None) -> pa.Table:
    """id, n_bytes, source, t_tokens, t_logprob[, r_tokens, r_logprob], sorted by id; every
    instance must have exactly one row in each table."""
    tables = [("teacher", teacher.rename_columns(["id", "t_tokens", "t_logprob"]))]
    if reference is not None:
        tables.append(("reference", reference.rename_columns(["id", "r_tokens", "r_logprob"])))
    joined = instances
    for role, table in tables:
        merged = joined.join(table, "id", join_type="inner")
        if merged.num_rows != instances.num_rows or table.num_rows != instances.num_rows:
            missing = pc.filter(instances["id"], pc.invert(pc.is_in(instances["id"], table["id"])))
            extra = pc.filter(table["id"], pc.invert(pc.is_in(table["id"], instances["id"])))
            example = (missing[0].as_py() if len(missing) else extra[0].as_py())
            raise ValueError(f"{role} table does not cover the instances: {len(missing)} instance "
                             f"ids missing, {len(extra)} unknown ids (e.g. {example!r})")
        joined = merged
    return joined.sort_by("id")


# ---------------------------------------------------------------- scoring and choosing


def per_unit(logprob: np.ndarray, tokens: np.ndarray, n_bytes: np.ndarray, normalize: str,
             ids: pa.Array, role: str) -> np.ndarray:
    denom = n_bytes if normalize == "byte" else tokens
    zero = np.flatnonzero(denom == 0)
    if len(zero):
        raise ValueError(f"{role}: instance {ids[int(zero[0])].as_py()!r} has 0 "
                         f"{'bytes' if normalize == 'byte' else 'tokens'}; cannot normalise")
    return logprob / denom


def selection_scores(table: pa.Table, cfg: SelectConfig) -> tuple[np.ndarray, np.ndarray]:
    """(score, ranking key) per row of the id-sorted join. The key equals the score except
    for `sample`, where Gumbel noise turns top-k into sampling without replacement."""
    n_bytes = table["n_bytes"].to_numpy()
    t = per_unit(table["t_logprob"].to_numpy(), table["t_tokens"].to_numpy(), n_bytes,
                 cfg.normalize, table["id"], "teacher")
    rng = np.random.default_rng(cfg.seed)
    if cfg.method == "teacher":
        return t, t
    if cfg.method == "random":
        draw = rng.random(table.num_rows)
        return draw, draw
    r = per_unit(table["r_logprob"].to_numpy(), table["r_tokens"].to_numpy(), n_bytes,
                 cfg.normalize, table["id"], "reference")
    score = t - r
    if cfg.method == "difference":
        return score, score
    return score, score / cfg.temperature + rng.gumbel(size=table.num_rows)


def choose(key: np.ndarray, ids: np.ndarray, tokens: np.ndarray, cfg: SelectConfig) -> np.ndarray:
    """Boolean mask of kept rows: the top floor(alpha*N) by key (ties: smaller id first), or
    with a token budget the best instances whose tokens fit in it."""
    order = np.lexsort((ids, -key))
    if cfg.budget_tokens is not None:
        n_keep = int(np.searchsorted(np.cumsum(tokens[order]), cfg.budget_tokens, side="right"))
    else:
        n_keep = keep_count(cfg.alpha, len(key))
    keep = np.zeros(len(key), dtype=bool)
    keep[order[:n_keep]] = True
    return keep


# ---------------------------------------------------------------- the stage


def run_select(cfg: SelectConfig) -> dict:
    """Run the select stage; returns its manifest (or, with dry_run, the report)."""
    from miniplm.io import read_instances_manifest

    print(describe(cfg), flush=True)
    started = time.time()
    inst_manifest = read_instances_manifest(cfg.instances)
    fp = inst_manifest["fingerprint"]
    teacher, t_manifest = load_score_table(cfg.teacher, "teacher", fp)
    reference = r_manifest = None
    if cfg.reference and cfg.method in ("difference", "sample"):
        reference, r_manifest = load_score_table(cfg.reference, "reference", fp)
        check_tokenizers(t_manifest, r_manifest, cfg.normalize)

    job = select_job(cfg, fp, t_manifest, r_manifest)
    if not cfg.dry_run and io.claim_output(cfg.output, job, overwrite=cfg.overwrite,
                                           what="a refined corpus"):
        manifest = io.read_json(io.join(cfg.output, io.MANIFEST))
        print(f"select: {cfg.output} is already complete ({manifest['instances']} kept); nothing to do")
        return manifest

    instances = read_columns(cfg.instances, inst_manifest["parts"], ["id", "n_bytes", "source"],
                             with_part=True)
    table = join_scores(instances, teacher, reference)
    score, key = selection_scores(table, cfg)
    ids = table["id"].to_numpy(zero_copy_only=False)
    keep = choose(key, ids, table["t_tokens"].to_numpy(), cfg)
    table = table.append_column("score", pa.array(score)).append_column("kept", pa.array(keep))

    threshold = float(score[keep].min()) if keep.any() else float("inf")
    sample_ids = pick_samples(table, score, threshold)
    texts = {}
    if cfg.dry_run:
        texts = read_texts(cfg.instances, inst_manifest["parts"], set(sample_ids))
    else:
        out_parts, fingerprint, texts = write_refined(cfg, inst_manifest["parts"], table, set(sample_ids))
    report = build_report(table, cfg, threshold)
    samples = samples_markdown(table, sample_ids, texts, cfg, threshold)
    print(report_summary(report), flush=True)
    if cfg.dry_run:
        print(samples)
        return report

    write_report_files(cfg.output, table, report, samples, threshold, cfg)
    kept_rows = sum(p["rows"] for p in out_parts)
    manifest = {
        "stage": "select", "version": __version__, "config": to_dict(cfg),
        "inputs": {"instances": {"path": cfg.instances, "fingerprint": fp},
                   "teacher": {"path": cfg.teacher, **_table_info(t_manifest)},
                   "reference": {"path": cfg.reference, **_table_info(r_manifest)} if r_manifest else None},
        "method": cfg.method, "normalize": cfg.normalize, "alpha": cfg.alpha,
        "budget_tokens": cfg.budget_tokens, "threshold": threshold,
        "candidates": table.num_rows, "instances": kept_rows,
        "tokens_kept": report["tokens_kept"], "bytes": sum(p["bytes"] for p in out_parts),
        "fingerprint": fingerprint, "parts": out_parts, "seconds": round(time.time() - started, 2),
    }
    io.write_manifest(cfg.output, manifest)
    print(f"select: kept {kept_rows} of {table.num_rows} instances -> {cfg.output}")
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


def _table_info(manifest: dict) -> dict:
    prov = manifest["provenance"]
    return {"model": prov.get("model"), "model_fingerprint": prov.get("model_fingerprint"),
            "tokenizer_fingerprint": prov.get("tokenizer_fingerprint")}


def check_tokenizers(t_manifest: dict, r_manifest: dict, normalize: str) -> None:
    t_tok = t_manifest["provenance"].get("tokenizer_fingerprint")
    r_tok = r_manifest["provenance"].get("tokenizer_fingerprint")
    if normalize == "token" and t_tok != r_tok:
        raise ValueError("teacher and reference use different tokenizers (fingerprints "
                         f"{t_tok} vs {r_tok}): per-token log-likelihoods are not comparable. "
                         "Use --normalize byte.")


def pick_samples(table: pa.Table, score: np.ndarray, threshold: float, k: int = 20) -> list[str]:
    ids = table["id"].to_numpy(zero_copy_only=False)
    order = np.lexsort((ids, -score))
    at = int(np.searchsorted(-score[order], -threshold, side="right")) if math.isfinite(threshold) else 0
    around = order[max(0, at - k // 2): at + k // 2]
    return list(dict.fromkeys([*ids[order[:k]], *ids[around], *ids[order[::-1][:k]]]))


def read_texts(root: str, parts: list[dict], wanted: set[str]) -> dict[str, str]:
    texts = {}
    for part in parts:
        with fsspec.open(io.join(root, part["name"]), "rb") as f:
            t = pq.read_table(f, columns=["id", "text"])
        t = t.filter(pc.is_in(t["id"], pa.array(sorted(wanted), pa.string())))
        texts.update(zip(t["id"].to_pylist(), t["text"].to_pylist()))
    return texts


def write_refined(cfg: SelectConfig, parts: list[dict], table: pa.Table, sample_ids: set[str]):
    """Stream the instance parts through the kept-id filter; same part names, empty parts skipped."""
    from tqdm.auto import tqdm

    kept = table.filter(table["kept"]).select(["id", "score", "_part"])
    # kept rows grouped by the part they came from: each part is matched against its own ids
    order = np.argsort(kept["_part"].to_numpy(), kind="stable")
    bounds = np.searchsorted(kept["_part"].to_numpy()[order], np.arange(len(parts) + 1))
    fingerprint = io.RowSetHash()
    out_parts, texts = [], {}
    sample_set = pa.array(sorted(sample_ids), pa.string())
    sample_parts = set(table.filter(pc.is_in(table["id"], sample_set))["_part"].to_pylist())
    for k, part in enumerate(tqdm(parts, desc="select: writing", unit="part")):
        if bounds[k] == bounds[k + 1] and k not in sample_parts:
            continue  # nothing kept here and no sample to show
        with fsspec.open(io.join(cfg.instances, part["name"]), "rb") as f:
            inst = pq.read_table(f)
        samples = inst.filter(pc.is_in(inst["id"], sample_set))
        texts.update(zip(samples["id"].to_pylist(), samples["text"].to_pylist()))
        part_kept = kept.take(order[bounds[k]:bounds[k + 1]]).select(["id", "score"])
        inst = inst.filter(pc.is_in(inst["id"], part_kept["id"]))
        if not inst.num_rows:
            continue
        refined = inst.join(part_kept, "id", join_type="inner").select(REFINED_SCHEMA.names)
        refined = refined.sort_by("id").cast(REFINED_SCHEMA)
        io.write_parquet(io.join(cfg.output, part["name"]), refined)
        for id_, text in zip(refined["id"].to_pylist(), refined["text"].to_pylist()):
            fingerprint.add(id_, text)
        out_parts.append({"name": part["name"], "rows": refined.num_rows,
                          "bytes": pc.sum(refined["n_bytes"]).as_py()})
    return out_parts, fingerprint.hexdigest(), texts


# ---------------------------------------------------------------- report


def build_report(table: pa.Table, cfg: SelectConfig, threshold: float) -> dict:
    score = table["score"].to_numpy()
    kept = table["kept"].to_numpy()
    tokens = table["t_tokens"].to_numpy()
    qs = [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0]
    per_source = {}
    sources = table["source"].to_numpy(zero_copy_only=False)
    for source in np.unique(sources):
        mask = sources == source
        per_source[str(source)] = {"kept": int((mask & kept).sum()), "dropped": int((mask & ~kept).sum()),
                              "tokens_kept": int(tokens[mask & kept].sum()),
                              "mean_score": float(score[mask].mean())}
    return {
        "method": cfg.method, "normalize": cfg.normalize, "alpha": cfg.alpha,
        "budget_tokens": cfg.budget_tokens, "candidates": int(len(score)), "kept": int(kept.sum()),
        "threshold": threshold, "tokens_total": int(tokens.sum()), "tokens_kept": int(tokens[kept].sum()),
        "score_quantiles": {str(q): float(np.quantile(score, q)) for q in qs} if len(score) else {},
        "per_source": per_source,
    }


def report_summary(report: dict) -> str:
    lines = [f"select ({report['method']}, per-{report['normalize']}): kept {report['kept']} of "
             f"{report['candidates']} instances, {report['tokens_kept']} of {report['tokens_total']} "
             f"teacher tokens, threshold score {report['threshold']:.4f}"]
    for source, s in report["per_source"].items():
        total = s["kept"] + s["dropped"]
        lines.append(f"  {source:24} kept {s['kept']:>8} / {total:<8} ({s['kept'] / max(total, 1):6.1%})"
                     f"  mean score {s['mean_score']:+.4f}")
    return "\n".join(lines)


def samples_markdown(table: pa.Table, sample_ids: list[str], texts: dict[str, str],
                     cfg: SelectConfig, threshold: float, width: int = 300) -> str:
    rows = {r["id"]: r for r in table.filter(pc.is_in(table["id"], pa.array(sample_ids, pa.string())))
            .to_pylist()}
    has_ref = "r_logprob" in table.column_names
    unit = cfg.normalize
    columns = ["id", "source", "score", "kept", f"teacher logprob/{unit}"]
    columns += [f"reference logprob/{unit}"] if has_ref else []
    columns += ["text"]
    head = "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"
    out = [f"# Selection samples ({cfg.method}, threshold {threshold:.4f})", ""]
    groups = [("Highest scores", sample_ids[:20]), ("Around the threshold", sample_ids[20:40]),
              ("Lowest scores", sample_ids[40:])]
    for title, group in groups:
        out += [f"## {title}", "", head]
        for id_ in sorted(group, key=lambda i: -rows[i]["score"]):
            r = rows[id_]
            text = " ".join(texts.get(id_, "").split())
            text = (text[:width] + " …" if len(text) > width else text).replace("|", "\\|")
            cells = [f"`{id_}`", r["source"], f"{r['score']:+.4f}", "yes" if r["kept"] else "no",
                     f"{r['t_logprob'] / _denominator(r, 't_tokens', unit):.3f}"]
            if has_ref:
                cells.append(f"{r['r_logprob'] / _denominator(r, 'r_tokens', unit):.3f}")
            out.append("| " + " | ".join(cells + [text]) + " |")
        out.append("")
    return "\n".join(out)


def _denominator(row: dict, tokens_key: str, unit: str) -> int:
    return max(row["n_bytes"] if unit == "byte" else row[tokens_key], 1)


def write_report_files(output: str, table: pa.Table, report: dict, samples: str,
                       threshold: float, cfg: SelectConfig) -> None:
    io.write_json(io.join(output, "report.json"), report)
    io.write_bytes(io.join(output, "samples.md"), samples.encode())
    io.write_bytes(io.join(output, "scores.png"), plot_scores(table, threshold, cfg))


def plot_scores(table: pa.Table, threshold: float, cfg: SelectConfig) -> bytes:
    """Histogram of scores with the threshold, and teacher vs reference coloured kept/dropped."""
    import io as _io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score, kept = table["score"].to_numpy(), table["kept"].to_numpy()
    has_ref = "r_logprob" in table.column_names
    fig, axes = plt.subplots(1, 2 if has_ref else 1, figsize=(12 if has_ref else 6, 4.5), squeeze=False)
    ax = axes[0][0]
    ax.hist(score, bins=60, color="#4C72B0")
    if math.isfinite(threshold):
        ax.axvline(threshold, color="#C44E52", linestyle="--", label=f"threshold {threshold:.3f}")
        ax.legend()
    ax.set(title=f"{cfg.method} scores ({kept.sum()} of {len(score)} kept)", xlabel="score",
           ylabel="instances")
    if has_ref:
        denom = table["n_bytes"].to_numpy() if cfg.normalize == "byte" else None
        t = table["t_logprob"].to_numpy() / (denom if denom is not None else table["t_tokens"].to_numpy())
        r = table["r_logprob"].to_numpy() / (denom if denom is not None else table["r_tokens"].to_numpy())
        ax = axes[0][1]
        idx = np.random.default_rng(0).permutation(len(t))[:20000]  # a readable scatter
        for mask, colour, label in [(~kept[idx], "#BBBBBB", "dropped"), (kept[idx], "#C44E52", "kept")]:
            ax.scatter(r[idx][mask], t[idx][mask], s=4, c=colour, label=label, alpha=0.6)
        lo, hi = float(min(t.min(), r.min())), float(max(t.max(), r.max()))
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
        ax.set(title="teacher vs reference", xlabel=f"reference log-likelihood / {cfg.normalize}",
               ylabel=f"teacher log-likelihood / {cfg.normalize}")
        ax.legend()
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
