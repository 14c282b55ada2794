"""report: several training runs -> comparison table, loss-vs-FLOPs plot, compute-saving factor.

A run folder (from `miniplm train`) holds `metrics.jsonl` (with periodic `eval_loss` and
`flops`) and optionally `eval.json` (from `miniplm eval`). The compute-saving factor is the
paper's headline number: how many times fewer training FLOPs the treatment needs to reach the
baseline's final held-out loss, with the treatment's crossing point interpolated on its curve
(linear in log FLOPs); "not reached" when its curve never gets there.

Training FLOPs are counted per model: the student's (6N per token plus attention) and an online
KD teacher's forward passes (2N per token plus attention); `flops` is their sum, and runs are
also compared at one total budget, the smallest any run reached. A MiniPLM student's corpus
also cost a one-off offline teacher pass over the pool (2N per token x scored tokens); it is
found through the run's config.json -> its corpus's select manifest -> the teacher score table
-> the teacher checkpoint, and stated amortised over the students here that reuse that table
(or as unknown when any link is unreachable).
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
from io import BytesIO

import numpy as np

from miniplm import console, io
from miniplm.config import describe, field
from miniplm.training.loop import load_metrics


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
    rows = load_metrics(io.join(path, "metrics.jsonl"))
    evals = [r for r in rows if "eval_loss" in r]
    name = posixpath.basename(path.rstrip("/"))
    run = {"name": name, "path": path, "rows": rows,
           "curve": Curve(name, np.array([r["flops"] for r in evals], dtype=float),
                          np.array([r["eval_loss"] for r in evals], dtype=float))}
    eval_json = io.join(path, "eval.json")
    run["eval"] = io.read_json(eval_json) if io.exists(eval_json) else None
    run["offline"] = offline_teacher_pass(path)
    return run


def offline_teacher_pass(run_path: str) -> dict | None:
    """The teacher scoring pass behind a run's corpus: {"table", "flops" (None: unknown), "why"};
    None when the corpus was not selected with a teacher's scores (or the run records no config)."""
    config_path = io.join(run_path, "config.json")
    if not io.exists(config_path):
        return None
    data = io.read_json(config_path).get("train", {}).get("data", {}).get("path")
    manifest_path = io.join(data, io.MANIFEST) if data else None
    if not manifest_path or not io.exists(manifest_path):
        return None
    selection = io.read_json(manifest_path)
    if selection.get("stage") != "select" or selection.get("method") == "random":
        return None  # not chosen by teacher scores: the pass is not this run's cost
    table = (selection.get("inputs", {}).get("teacher") or {}).get("path")
    entry = {"table": table, "flops": None}
    if not table or not io.exists(io.join(table, io.MANIFEST)):
        return {**entry, "why": f"teacher score table {table} unreachable"}
    scores = io.read_json(io.join(table, io.MANIFEST))
    model, tokens = scores.get("provenance", {}).get("model"), scores.get("tokens")
    if not model or tokens is None or not io.exists(io.join(model, "config.json")):
        return {**entry, "why": f"teacher checkpoint {model} unreachable"}
    # attention over the mean instance (within the scorer's window), not the whole window:
    # pipeline instances are short, and charging every token a full-window context overstates
    max_length = scores["provenance"].get("max_length") or float("inf")
    context = int(min(max_length, tokens / max(1, scores.get("rows") or 1)))
    per_token = forward_flops_per_token(model, context)
    return {**entry, "flops": per_token * tokens, "tokens": tokens, "teacher": model,
            "why": f"2N + attention over {context}-token instances, x {tokens:,} scored tokens"}


def forward_flops_per_token(model_path: str, context: int | None) -> int:
    """A checkpoint's forward FLOPs per token, counted as training counts them (distill), from
    its config alone: the model is built on the meta device, no weights read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from miniplm.training.flops import flops_per_token

    config = AutoConfig.from_pretrained(io.local_copy(io.join(model_path, "config.json")))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return flops_per_token(model, context or 0, training=False)


def loss_at(curve: Curve, flops: float) -> float | None:
    """Held-out loss at `flops` on the curve (linear in log FLOPs); None outside its range."""
    if not len(curve.flops) or not curve.flops[0] <= flops <= curve.flops[-1]:
        return None
    return float(np.interp(math.log(flops), np.log(curve.flops), curve.loss))


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
    console.detail(describe(cfg))
    runs = [load_run(p) for p in cfg.runs]
    for run in runs:
        if not len(run["curve"].flops):
            raise ValueError(f"{run['path']}: metrics.jsonl has no eval_loss; train with eval.data set")
    by_name = {r["name"]: r for r in runs}
    for key in ("baseline", "treatment"):
        name = getattr(cfg, key)
        if name and name not in by_name:
            raise ValueError(f"--{key} {name}: not one of the runs given ({', '.join(by_name)}); "
                             "name a run by its folder name")
    base = by_name[cfg.baseline] if cfg.baseline else runs[0]
    treat = by_name[cfg.treatment] if cfg.treatment else (runs[1] if len(runs) > 1 else None)
    factor = compute_saving_factor(base["curve"], treat["curve"]) if treat else None
    equal = min(float(r["curve"].flops[-1]) for r in runs)  # a total budget every run reached
    summary = {"baseline": base["name"], "treatment": treat["name"] if treat else None,
               "compute_saving_factor": factor, "equal_flops": equal, "runs": {}}
    sharing: dict[str, int] = {}  # teacher score table -> students here whose corpus it selected
    for run in runs:
        if run["offline"]:
            sharing[run["offline"]["table"]] = sharing.get(run["offline"]["table"], 0) + 1
    for run in runs:
        last = run["rows"][-1]
        entry = {"steps": last["step"], "tokens": last["tokens"], "flops": last["flops"],
                 "student_flops": last.get("student_flops", last["flops"]),
                 "teacher_flops": last.get("teacher_flops", 0),
                 "eval_loss_at_equal_flops": loss_at(run["curve"], equal),
                 "final_eval_loss": float(run["curve"].loss[-1]), "power_law": fit_power_law(run["curve"])}
        if run["offline"]:
            off = run["offline"]
            students = sharing[off["table"]]
            entry["offline_teacher"] = {**off, "students": students,
                                        "flops_per_student": off["flops"] / students if off["flops"] else None}
        if run["eval"]:
            entry.update(bits_per_byte=run["eval"]["bits_per_byte"],
                         loss_per_token=run["eval"]["loss_per_token"],
                         tasks={t: m.get("acc") for t, m in run["eval"]["tasks"].items()})
        summary["runs"][run["name"]] = entry
    io.write_json(io.join(cfg.output, "report.json"), summary)
    table = markdown_table(summary)
    io.write_bytes(io.join(cfg.output, "report.md"), (table + "\n").encode())
    io.write_bytes(io.join(cfg.output, "loss_vs_flops.png"), plot_curves(runs, summary))
    print(markdown_table(summary, brief=not console.verbose()), flush=True)
    return summary


def markdown_table(summary: dict, brief: bool = False) -> str:
    """The runs' table and the compute-saving factor; unless `brief`, how FLOPs were counted too."""
    tasks = sorted({t for r in summary["runs"].values() for t in r.get("tasks", {})})
    equal = summary.get("equal_flops")
    head = ["run", "tokens", "student FLOPs", "teacher FLOPs", "total FLOPs", "held-out loss",
            f"loss @ {equal:.3g} FLOPs" if equal else "loss @ equal FLOPs", "offline teacher / student",
            "bits/byte", *tasks]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, r in summary["runs"].items():
        bpb = f"{r['bits_per_byte']:.4f}" if "bits_per_byte" in r else "-"
        accs = [f"{r['tasks'][t]:.3f}" if r.get("tasks", {}).get(t) is not None else "-" for t in tasks]
        at_equal = r.get("eval_loss_at_equal_flops")
        off = r.get("offline_teacher")
        offline = "-" if not off else (f"{off['flops_per_student']:.3g}" if off["flops"] else "unknown")
        lines.append("| " + " | ".join([name, f"{r['tokens']:,}", f"{r.get('student_flops', r['flops']):.3g}",
                                        f"{r.get('teacher_flops', 0):.3g}", f"{r['flops']:.3g}",
                                        f"{r['final_eval_loss']:.4f}",
                                        f"{at_equal:.4f}" if at_equal is not None else "-", offline,
                                        bpb, *accs]) + " |")
    notes = ["", "FLOPs: student 6N + attention per token trained, online KD teacher 2N + attention per "
                  "token (N: weights multiplied per token, LM head included); total = their sum."]
    if equal:
        notes.append(f"Runs compared at {equal:.3g} total FLOPs, the smallest budget all of them reached.")
    for names, off in _offline_passes(summary).values():
        if off["flops"]:
            notes.append(f"- offline teacher pass behind {', '.join(names)}: {off['flops']:.3g} FLOPs once "
                         f"({off['why']}), shared by the {off['students']} student(s) here: "
                         f"{off['flops_per_student']:.3g} each; not in the curves, which count training FLOPs")
        else:
            notes.append(f"- offline teacher pass behind {', '.join(names)}: FLOPs unknown ({off['why']})")
    if not brief:
        lines += notes
    factor = summary["compute_saving_factor"]
    if summary["treatment"]:
        said = f"{factor:.2f}x" if factor is not None else "not reached"
        lines += [""] * (not brief) + [f"Compute-saving factor of {summary['treatment']} over {summary['baseline']}: {said} "
                      f"(FLOPs to reach {summary['baseline']}'s final held-out loss)"]
    for name, r in summary["runs"].items():
        if r["power_law"]:
            lines.append(f"- {name}: {r['power_law']['formula']}")
    return "\n".join(lines)


def _offline_passes(summary: dict) -> dict[str, tuple[list[str], dict]]:
    """teacher score table -> (the runs whose corpus it selected, its offline pass)."""
    passes: dict[str, tuple[list[str], dict]] = {}
    for name, r in summary["runs"].items():
        if r.get("offline_teacher"):
            passes.setdefault(r["offline_teacher"]["table"], ([], r["offline_teacher"]))[0].append(name)
    return passes


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
