"""report: several training runs -> comparison table, loss-vs-FLOPs plot, compute-saving factor.

A run folder (from `miniplm train`) holds `metrics.jsonl` (with periodic `eval_loss` and
`flops`) and optionally `eval.json` (from `miniplm eval`). The compute-saving factor is the
paper's headline number: how many times fewer training FLOPs the treatment needs to reach the
baseline's final held-out loss, with the treatment's crossing point interpolated on its curve
(linear in log FLOPs); "not reached" when its curve never gets there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import posixpath
from io import BytesIO

import fsspec
import numpy as np

from miniplm import io
from miniplm.config import describe, field


@dataclasses.dataclass(kw_only=True, frozen=True)
class ReportConfig:
    runs: list[str] = field(path=True, help="run folders (each with metrics.jsonl)", flag="positional")
    output: str = field(path=True, help="folder for report.md, report.json and loss_vs_flops.png")
    baseline: str | None = field(None, help="run name (folder name) of the baseline (default: first)")
    treatment: str | None = field(None, help="run name of the treatment (default: second)")


@dataclasses.dataclass
class Curve:
    name: str
    flops: np.ndarray   # training FLOPs at each held-out evaluation
    loss: np.ndarray    # held-out loss there


def load_run(path: str) -> dict:
    with fsspec.open(io.join(path, "metrics.jsonl"), "r") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    evals = [r for r in rows if "eval_loss" in r]
    name = posixpath.basename(path.rstrip("/"))
    run = {"name": name, "path": path, "rows": rows,
           "curve": Curve(name, np.array([r["flops"] for r in evals], dtype=float),
                          np.array([r["eval_loss"] for r in evals], dtype=float))}
    eval_json = io.join(path, "eval.json")
    run["eval"] = io.read_json(eval_json) if io.exists(eval_json) else None
    return run


def flops_to_reach(curve: Curve, target: float) -> float | None:
    """FLOPs at which the curve first reaches `target` loss, interpolated in log FLOPs."""
    below = np.flatnonzero(curve.loss <= target)
    if not len(below):
        return None
    i = int(below[0])
    if i == 0:
        return float(curve.flops[0])
    x0, x1 = math.log(curve.flops[i - 1]), math.log(curve.flops[i])
    y0, y1 = curve.loss[i - 1], curve.loss[i]
    t = (y0 - target) / (y0 - y1) if y0 != y1 else 1.0
    return math.exp(x0 + t * (x1 - x0))


def compute_saving_factor(baseline: Curve, treatment: Curve) -> float | None:
    """baseline FLOPs / treatment FLOPs to reach the baseline's final loss (None: not reached)."""
    needed = flops_to_reach(treatment, float(baseline.loss[-1]))
    return None if needed is None else float(baseline.flops[-1]) / needed


def fit_power_law(curve: Curve) -> dict | None:
    """L(C) = a * C^-b + c, fitted when there are at least 4 points."""
    if len(curve.flops) < 4:
        return None
    from scipy.optimize import curve_fit

    scale = float(curve.flops[-1])
    x = curve.flops / scale  # fit in units of the run's final FLOPs: well-conditioned

    def law(x, a, b, c):
        return a * np.power(x, -b) + c

    try:
        (a, b, c), _ = curve_fit(law, x, curve.loss, p0=(1.0, 0.5, float(curve.loss.min()) - 0.5),
                                 maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    return {"a": float(a * scale**b), "b": float(b), "c": float(c),
            "formula": f"L(C) = {a * scale**b:.4g} * C^-{b:.4f} + {c:.4f}"}


def run_report(cfg: ReportConfig) -> dict:
    print(describe(cfg), flush=True)
    runs = [load_run(p) for p in cfg.runs]
    for run in runs:
        if not len(run["curve"].flops):
            raise ValueError(f"{run['path']}: metrics.jsonl has no eval_loss; train with eval.data set")
    by_name = {r["name"]: r for r in runs}
    base = by_name[cfg.baseline] if cfg.baseline else runs[0]
    treat = by_name[cfg.treatment] if cfg.treatment else (runs[1] if len(runs) > 1 else None)
    factor = compute_saving_factor(base["curve"], treat["curve"]) if treat else None
    summary = {"baseline": base["name"], "treatment": treat["name"] if treat else None,
               "compute_saving_factor": factor, "runs": {}}
    for run in runs:
        last = run["rows"][-1]
        entry = {"steps": last["step"], "tokens": last["tokens"], "flops": last["flops"],
                 "final_eval_loss": float(run["curve"].loss[-1]), "power_law": fit_power_law(run["curve"])}
        if run["eval"]:
            entry.update(bits_per_byte=run["eval"]["bits_per_byte"],
                         loss_per_token=run["eval"]["loss_per_token"],
                         tasks={t: m.get("acc") for t, m in run["eval"]["tasks"].items()})
        summary["runs"][run["name"]] = entry
    io.write_json(io.join(cfg.output, "report.json"), summary)
    table = markdown_table(summary)
    io.write_bytes(io.join(cfg.output, "report.md"), (table + "\n").encode())
    io.write_bytes(io.join(cfg.output, "loss_vs_flops.png"), plot_curves(runs, summary))
    print(table)
    return summary


def markdown_table(summary: dict) -> str:
    tasks = sorted({t for r in summary["runs"].values() for t in r.get("tasks", {})})
    head = ["run", "tokens", "FLOPs", "held-out loss", "bits/byte", *tasks]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, r in summary["runs"].items():
        bpb = f"{r['bits_per_byte']:.4f}" if "bits_per_byte" in r else "-"
        accs = [f"{r['tasks'][t]:.3f}" if r.get("tasks", {}).get(t) is not None else "-" for t in tasks]
        lines.append("| " + " | ".join([name, f"{r['tokens']:,}", f"{r['flops']:.3g}",
                                        f"{r['final_eval_loss']:.4f}", bpb, *accs]) + " |")
    factor = summary["compute_saving_factor"]
    if summary["treatment"]:
        said = f"{factor:.2f}x" if factor is not None else "not reached"
        lines += ["", f"Compute-saving factor of {summary['treatment']} over {summary['baseline']}: {said} "
                      f"(FLOPs to reach {summary['baseline']}'s final held-out loss)"]
    for name, r in summary["runs"].items():
        if r["power_law"]:
            lines.append(f"- {name}: {r['power_law']['formula']}")
    return "\n".join(lines)


def plot_curves(runs: list[dict], summary: dict) -> bytes:
    """The loss-vs-FLOPs figure as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        c = run["curve"]
        ax.plot(c.flops, c.loss, marker="o", markersize=3, label=run["name"])
    base = next(r for r in runs if r["name"] == summary["baseline"])
    ax.axhline(base["curve"].loss[-1], color="gray", linestyle=":", linewidth=1,
               label=f"{base['name']} final loss")
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="held-out loss (nats/token)",
           title="held-out loss vs compute" + (f" (saving {summary['compute_saving_factor']:.2f}x)"
                                                if summary["compute_saving_factor"] else ""))
    ax.legend()
    fig.tight_layout()
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
