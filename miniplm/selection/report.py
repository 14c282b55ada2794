"""The selection's report, beside the refined corpus: `report.json` (score quantiles, kept and
dropped per source), `scores.png` (histogram, teacher-vs-reference scatter) and `samples.md`
(the highest, around the threshold and lowest), and the summary line the stage prints. `cfg`
is the stage's SelectConfig (duck-typed: the stage imports this module, not the reverse)."""

from __future__ import annotations

import math

import numpy as np

from miniplm import io

SAMPLES = 20  # instances shown per group in samples.md



def pick_samples(candidates: list[dict], threshold: float, k: int = SAMPLES) -> list[str]:
    """Ids of the highest, around-the-threshold and lowest instances, out of the parts'
    candidates (which hold every instance that can be among them)."""
    ids = np.array([c["id"] for c in candidates], dtype=object)
    score = np.array([c["score"] for c in candidates], dtype=np.float64)
    order = np.lexsort((ids, -score))
    at = int(np.searchsorted(-score[order], -threshold, side="right")) if math.isfinite(threshold) else 0
    around = order[max(0, at - k // 2): at + k // 2]
    return list(dict.fromkeys([*ids[order[:k]], *ids[around], *ids[order[::-1][:k]]]))


def build_report(score: np.ndarray, results: list[dict], cfg, threshold: float) -> dict:
    qs = [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0]
    per_source: dict[str, dict] = {}
    for r in results:
        for source, s in r["stats"]["per_source"].items():
            total = per_source.setdefault(source, dict.fromkeys(s, 0))
            for name, value in s.items():
                total[name] += value
    for s in per_source.values():
        s["mean_score"] = s.pop("score_sum") / max(s["kept"] + s["dropped"], 1)
    return {
        "method": cfg.method, "normalize": cfg.normalize, "alpha": cfg.alpha,
        "budget_tokens": cfg.budget_tokens, "candidates": int(len(score)),
        "kept": sum(s["kept"] for s in per_source.values()), "threshold": threshold,
        "tokens_total": sum(r["stats"]["tokens_total"] for r in results),
        "tokens_kept": sum(r["stats"]["tokens_kept"] for r in results),
        "score_quantiles": {str(q): float(v) for q, v in zip(qs, np.quantile(score, qs))} if len(score) else {},
        "per_source": dict(sorted(per_source.items())),
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


def samples_markdown(candidates: list[dict], sample_ids: list[str], cfg,
                     threshold: float) -> str:
    rows = {r["id"]: r for r in candidates}
    has_ref = cfg.uses_reference
    unit = cfg.normalize
    columns = ["id", "source", "score", "kept", f"teacher logprob/{unit}"]
    columns += [f"reference logprob/{unit}"] if has_ref else []
    columns += ["text"]
    head = "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"
    out = [f"# Selection samples ({cfg.method}, threshold {threshold:.4f})", ""]
    groups = [("Highest scores", sample_ids[:SAMPLES]), ("Around the threshold", sample_ids[SAMPLES:2 * SAMPLES]),
              ("Lowest scores", sample_ids[2 * SAMPLES:])]
    for title, group in groups:
        out += [f"## {title}", "", head]
        for id_ in sorted(group, key=lambda i: -rows[i]["score"]):
            r = rows[id_]
            cells = [f"`{id_}`", r["source"], f"{r['score']:+.4f}", "yes" if r["kept"] else "no",
                     f"{r['t_logprob'] / _denominator(r, 't_tokens', unit):.3f}"]
            if has_ref:
                cells.append(f"{r['r_logprob'] / _denominator(r, 'r_tokens', unit):.3f}")
            out.append("| " + " | ".join(cells + [r["text"].replace("|", "\\|")]) + " |")
        out.append("")
    return "\n".join(out)


def _denominator(row: dict, tokens_key: str, unit: str) -> int:
    return max(row["n_bytes"] if unit == "byte" else row[tokens_key], 1)


def write_report_files(output: str, score: np.ndarray, results: list[dict], report: dict, samples: str,
                       threshold: float, cfg) -> None:
    io.write_json(io.join(output, "report.json"), report)
    io.write_bytes(io.join(output, "samples.md"), samples.encode())
    points = None
    if cfg.uses_reference:
        plots = [r["plot"] for r in results]
        points = {name: np.concatenate([p[name] for p in plots]) for name in ("t", "r", "kept")}
        points.update(lo=min(p["lo"] for p in plots), hi=max(p["hi"] for p in plots))
    io.write_bytes(io.join(output, "scores.png"), plot_scores(score, report["kept"], threshold, cfg, points))


def plot_scores(score: np.ndarray, n_kept: int, threshold: float, cfg,
                points: dict | None) -> bytes:
    """Histogram of scores with the threshold, and teacher vs reference coloured kept/dropped
    (`points`: a sample of instances, and the range of both over all of them)."""
    import io as _io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if points else 1, figsize=(12 if points else 6, 4.5), squeeze=False)
    ax = axes[0][0]
    counts, edges = np.histogram(score, bins=60)  # in blocks: no copy of the scores
    ax.hist(edges[:-1], edges, weights=counts, color="#4C72B0")
    if math.isfinite(threshold):
        ax.axvline(threshold, color="#C44E52", linestyle="--", label=f"threshold {threshold:.3f}")
        ax.legend()
    ax.set(title=f"{cfg.method} scores ({n_kept} of {len(score)} kept)", xlabel="score",
           ylabel="instances")
    if points:
        ax = axes[0][1]
        t, r, kept = points["t"], points["r"], points["kept"]
        for mask, colour, label in [(~kept, "#BBBBBB", "dropped"), (kept, "#C44E52", "kept")]:
            ax.scatter(r[mask], t[mask], s=4, c=colour, label=label, alpha=0.6)
        ax.plot([points["lo"], points["hi"]], [points["lo"], points["hi"]], color="black", linewidth=0.8)
        ax.set(title="teacher vs reference", xlabel=f"reference log-likelihood / {cfg.normalize}",
               ylabel=f"teacher log-likelihood / {cfg.normalize}")
        ax.legend()
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
