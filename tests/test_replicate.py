"""The seed study (jobs/bench_demo.py): student names per seed and budget, the verdict's rule."""

from __future__ import annotations

import statistics

from miniplm.studies.replicate import SeedResult, seeds_table, students_for, verdict


def test_two_budgets_of_one_preset_get_their_own_students():
    """A study at another token budget in the same run folder trains its own students instead
    of meeting the first study's (which the train stage refuses: other settings)."""
    short, long = students_for([0, 1], "mini", 400_000), students_for([0, 1], "mini", 1_200_000)
    assert len({s.name for s in short + long}) == 8
    assert [(s.corpus, s.seed, s.tokens) for s in short] == [
        ("random", 0, 400_000), ("refined", 0, 400_000), ("random", 1, 400_000), ("refined", 1, 400_000)]


def results(rows):
    return [SeedResult(seed=i, vanilla=v, miniplm=m, saving=s) for i, (v, m, s) in enumerate(rows)]


def test_the_effect_stands_out_only_when_every_seed_and_the_mean_say_so():
    # the demo's students on its corpora (README): lower in 6 of 6, mean gain > either arm's sd
    tiny = [(5.7080, 5.5256, 1.59), (5.6317, 5.5236, 1.39), (5.6110, 5.5321, 1.30),
            (5.7594, 5.5552, 1.64), (5.5652, 5.4813, 1.47), (5.7505, 5.6564, 1.42)]
    gains = [v - m for v, m, _ in tiny]
    spread = max(statistics.stdev([v for v, _, _ in tiny]), statistics.stdev([m for _, m, _ in tiny]))
    assert all(g > 0 for g in gains) and statistics.fmean(gains) > spread
    assert verdict(results(tiny)).endswith("The effect stands out of the spread.")
    assert "| mean ± sd | 5.6710 ± 0.0798 | 5.5457 ± 0.0593 | +0.1253 ± 0.0541 | min 1.30x |" in seeds_table(
        results(tiny))

    # mini students at 400k tokens: a seed where MiniPLM is higher and never reaches vanilla
    mini = [(5.9842, 5.6077, 1.89), (5.7547, 5.7718, None), (5.6753, 5.6278, 1.12)]
    assert verdict(results(mini)).endswith("The effect does NOT stand out of the spread.")
    assert "not reached" in seeds_table(results(mini))
    # every seed lower and every saving above 1, but the mean gain inside the spread
    noisy = [(5.9, 5.85, 1.1), (5.5, 5.45, 1.1), (5.7, 5.65, 1.1)]
    assert statistics.fmean(v - m for v, m, _ in noisy) < statistics.stdev([v for v, _, _ in noisy])
    assert verdict(results(noisy)).endswith("does NOT stand out of the spread.")
