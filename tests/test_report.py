"""report: compute-saving factor with a known answer, "not reached", power law, PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest

from miniplm.report import Curve, ReportConfig, compute_saving_factor, fit_power_law, run_report


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
