"""report: compute-saving factor with a known answer, "not reached", power law, PNG."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from miniplm.evaluation.report import Curve, ReportConfig, compute_saving_factor, fit_power_law, run_report


def law(c):
    return 2.0 + 30.0 * c ** -0.25


def write_run(path, flops, loss):
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w") as f:
        for i, (c, l) in enumerate(zip(flops, loss)):
            f.write(json.dumps({"step": i + 1, "tokens": int(c / 6e6), "flops": float(c), "loss": l + 0.1,
                                "eval_loss": float(l)}) + "\n")


GRID = 1e12 * 3 ** (np.arange(13) / 4)  # geometric: C/3 of every point is on the grid too


def test_compute_saving_factor_recovers_a_known_shift(tmp_path):
    base = Curve("vanilla", GRID, law(GRID))
    treat = Curve("miniplm", GRID, law(3 * GRID))  # reaches every loss with 3x fewer FLOPs
    assert compute_saving_factor(base, treat) == pytest.approx(3.0, rel=1e-9)
    worse = Curve("worse", GRID, law(GRID / 2))
    assert compute_saving_factor(base, worse) is None
    fit = fit_power_law(base)
    assert fit["b"] == pytest.approx(0.25, rel=1e-3) and fit["c"] == pytest.approx(2.0, rel=1e-3)


def test_report_writes_table_plot_and_factor(tmp_path):
    write_run(tmp_path / "vanilla", GRID, law(GRID))
    write_run(tmp_path / "miniplm", GRID, law(3 * GRID))
    write_run(tmp_path / "worse", GRID, law(GRID / 2))
    summary = run_report(ReportConfig(runs=[str(tmp_path / n) for n in ("vanilla", "miniplm", "worse")],
                                      output=str(tmp_path / "report")))
    assert summary["compute_saving_factor"] == pytest.approx(3.0, rel=1e-9)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "3.00x" in md and "| vanilla |" in md and "| worse |" in md
    assert (tmp_path / "report" / "loss_vs_flops.png").stat().st_size > 10_000
    not_reached = run_report(ReportConfig(runs=[str(tmp_path / "vanilla"), str(tmp_path / "worse")],
                                          output=str(tmp_path / "r2")))
    assert not_reached["compute_saving_factor"] is None
    assert "not reached" in (tmp_path / "r2" / "report.md").read_text()


def test_a_torn_last_metrics_line_is_dropped_a_corrupt_one_inside_is_an_error(tmp_path, capsys):
    """A run killed while it appended a metrics line leaves half a line at the end: the report
    drops it and says so once; a bad line before the end is no kill's doing and stops the report."""
    write_run(tmp_path / "vanilla", GRID, law(GRID))
    write_run(tmp_path / "miniplm", GRID, law(3 * GRID))
    metrics = tmp_path / "miniplm" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 14, "tokens": 9')
    cfg = ReportConfig(runs=[str(tmp_path / "vanilla"), str(tmp_path / "miniplm")],
                       output=str(tmp_path / "report"))
    assert run_report(cfg)["compute_saving_factor"] == pytest.approx(3.0, rel=1e-9)
    said = [line for line in capsys.readouterr().out.splitlines() if "metrics.jsonl" in line]
    assert len(said) == 1 and str(metrics) in said[0] and "line 14" in said[0], said

    lines = metrics.read_text().splitlines(keepends=True)
    lines[3] = lines[3][:20] + "\n"
    metrics.write_text("".join(lines))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(metrics))}: line 4 is not a JSON metrics row"):
        run_report(cfg)


def write_kd_run(path, flops, loss, teacher_share: float, data: str | None = None):
    """A run whose rows split total FLOPs into student and online-teacher FLOPs, optionally
    with the config.json `miniplm train` writes (naming its corpus)."""
    write_run(path, flops, loss)
    rows = [json.loads(line) for line in open(path / "metrics.jsonl")]
    with open(path / "metrics.jsonl", "w") as f:
        for r in rows:
            r["teacher_flops"] = r["flops"] * teacher_share
            r["student_flops"] = r["flops"] - r["teacher_flops"]
            f.write(json.dumps(r) + "\n")
    if data:
        (path / "config.json").write_text(json.dumps({"train": {"data": {"path": data}}}))


def test_report_lists_flops_per_model_and_the_offline_teacher_pass(tmp_path, llama_dir):
    from transformers import AutoModelForCausalLM

    from miniplm.training.flops import matmul_params

    # MiniPLM's chain: corpus (select manifest) -> teacher score table -> teacher checkpoint
    table, refined, lost = tmp_path / "scores", tmp_path / "refined", tmp_path / "refined_elsewhere"
    for folder, manifest in [
            (table, {"stage": "score", "tokens": 1_000_000, "rows": 10_000,  # 100-token instances
                     "provenance": {"model": str(llama_dir), "max_length": 64}}),
            (refined, {"stage": "select", "method": "difference", "inputs": {"teacher": {"path": str(table)}}}),
            (lost, {"stage": "select", "method": "difference",
                    "inputs": {"teacher": {"path": str(tmp_path / "gone")}}}),
            (tmp_path / "random", {"stage": "select", "method": "random",
                                   "inputs": {"teacher": {"path": str(table)}}})]:
        folder.mkdir()
        (folder / "_manifest.json").write_text(json.dumps(manifest))
    write_kd_run(tmp_path / "vanilla", GRID, law(GRID), 0.0, data=str(tmp_path / "random"))
    write_kd_run(tmp_path / "kd", GRID[:-2], law(GRID[:-2]), 0.6, data=str(tmp_path / "random"))
    write_kd_run(tmp_path / "miniplm", GRID, law(3 * GRID), 0.0, data=str(refined))
    write_kd_run(tmp_path / "miniplm-kd", GRID, law(3 * GRID), 0.6, data=str(refined))
    write_kd_run(tmp_path / "miniplm-lost", GRID, law(3 * GRID), 0.0, data=str(lost))
    names = ["vanilla", "kd", "miniplm", "miniplm-kd", "miniplm-lost"]
    summary = run_report(ReportConfig(runs=[str(tmp_path / n) for n in names], output=str(tmp_path / "report")))

    md = (tmp_path / "report" / "report.md").read_text()
    assert "| run | tokens | student FLOPs | teacher FLOPs | total FLOPs |" in md
    runs = summary["runs"]
    for name in names:
        r = runs[name]
        assert r["student_flops"] + r["teacher_flops"] == pytest.approx(r["flops"])
        assert f"| {name} | {r['tokens']:,} | {r['student_flops']:.3g} | {r['teacher_flops']:.3g} | {r['flops']:.3g} |" in md
    # equal total FLOPs: the smallest final budget (the KD run's), each curve read there
    assert summary["equal_flops"] == pytest.approx(GRID[-3])
    assert runs["vanilla"]["eval_loss_at_equal_flops"] == pytest.approx(law(GRID[-3]))
    assert runs["miniplm"]["eval_loss_at_equal_flops"] == pytest.approx(law(3 * GRID[-3]))
    # the offline pass: 2N + attention over the instances (at most the scorer's 64-token window)
    # per scored token, shared by two students
    teacher = AutoModelForCausalLM.from_pretrained(llama_dir)
    offline = (2 * matmul_params(teacher) + 4 * 2 * 64 * 64) * 1_000_000
    for name in ("miniplm", "miniplm-kd"):
        assert runs[name]["offline_teacher"]["flops"] == offline
        assert runs[name]["offline_teacher"]["flops_per_student"] == offline / 2
    assert "offline_teacher" not in runs["vanilla"] and "offline_teacher" not in runs["kd"]
    assert runs["miniplm-lost"]["offline_teacher"]["flops"] is None
    assert f"{offline:.3g} FLOPs once" in md and "shared by the 2 student(s) here" in md
    assert "miniplm-lost: FLOPs unknown" in md
