"""Replicate the vanilla-vs-MiniPLM comparison over seeds: one run says little when a tiny
student's held-out loss moves from seed to seed, so the claim is made with a mean and a spread.

For every seed, a vanilla student (the random corpus) and a MiniPLM student (the refined corpus)
of the same shape and token budget are added to a pipeline and trained with that seed (model
initialisation and data order). Everything before them (corpus, teacher, reference, score
tables, both selections) is the pipeline's own and reused. The table per seed: held-out loss of
each (nats per token over the whole held-out set), the gain (vanilla - MiniPLM) and the
compute-saving factor (how many times fewer FLOPs MiniPLM needs to reach vanilla's final loss).
"""

from __future__ import annotations

import dataclasses
import os
import statistics

from miniplm import io
from miniplm.evaluation.report import compute_saving_factor, load_run
from miniplm.pipeline.run import PipelineConfig, StudentSpec, run_pipeline


@dataclasses.dataclass(kw_only=True, frozen=True)
class SeedResult:
    seed: int
    vanilla: float    # held-out loss per token
    miniplm: float
    saving: float | None  # None: MiniPLM's curve never reached vanilla's final loss

    @property
    def gain(self) -> float:
        return self.vanilla - self.miniplm


def students_for(seeds: list[int], preset: str, tokens: int, prefix: str = "seeds") -> list[StudentSpec]:
    """A vanilla / MiniPLM pair per seed, named by preset, budget and seed: a study at another
    budget in the same run folder trains students of its own."""
    return [StudentSpec(name=f"{prefix}-{arm}-{preset}-{tokens}-s{seed}", corpus=corpus, preset=preset,
                        tokens=tokens, seed=seed)
            for seed in seeds for arm, corpus in (("vanilla", "random"), ("miniplm", "refined"))]


def replicate(cfg: PipelineConfig, seeds: list[int], preset: str, tokens: int) -> list[SeedResult]:
    """Train the student pairs (reusing whatever is already trained) and collect the results."""
    students = students_for(seeds, preset, tokens)
    run_pipeline(dataclasses.replace(cfg, students=students, report=f"report-seeds-{preset}-{tokens}"))
    results = []
    for seed, (vanilla, miniplm) in zip(seeds, zip(students[::2], students[1::2])):
        runs = [load_run(os.path.join(cfg.output, "students", st.name)) for st in (vanilla, miniplm)]
        losses = [io.read_json(os.path.join(r["path"], "eval.json"))["loss_per_token"] for r in runs]
        results.append(SeedResult(seed=seed, vanilla=losses[0], miniplm=losses[1],
                                  saving=compute_saving_factor(runs[0]["curve"], runs[1]["curve"])))
    return results


def seeds_table(results: list[SeedResult]) -> str:
    """Per seed, then mean ± standard deviation (and, for the saving, the smallest)."""
    def spread(values: list[float], sign: str = "") -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):{sign}.4f} ± {sd:.4f}"

    def saving(x: float | None) -> str:
        return f"{x:.2f}x" if x is not None else "not reached"

    lines = ["| seed | vanilla loss | MiniPLM loss | gain | compute saving |", "|---|---|---|---|---|"]
    lines += [f"| {r.seed} | {r.vanilla:.4f} | {r.miniplm:.4f} | {r.gain:+.4f} | {saving(r.saving)} |"
              for r in results]
    savings = [r.saving for r in results]
    worst = "not reached" if None in savings else f"min {min(savings):.2f}x"
    lines.append(f"| mean ± sd | {spread([r.vanilla for r in results])} | {spread([r.miniplm for r in results])} "
                 f"| {spread([r.gain for r in results], '+')} | {worst} |")
    return "\n".join(lines)


def verdict(results: list[SeedResult]) -> str:
    """Whether the effect stands out of the seed-to-seed spread, said plainly."""
    gains = [r.gain for r in results]
    spread = max(statistics.stdev([r.vanilla for r in results]), statistics.stdev([r.miniplm for r in results])) \
        if len(results) > 1 else float("nan")
    every_seed = all(g > 0 for g in gains)
    every_saving = all(r.saving is not None and r.saving > 1 for r in results)
    mean_gain = statistics.fmean(gains)
    return (f"MiniPLM lower in {sum(g > 0 for g in gains)} of {len(gains)} seeds; mean gain {mean_gain:+.4f} "
            f"nats/token vs seed-to-seed spread (sd of either arm) {spread:.4f}; compute saving > 1 in "
            f"{sum(r.saving is not None and r.saving > 1 for r in results)} of {len(results)} seeds. "
            + ("The effect stands out of the spread." if every_seed and every_saving and mean_gain > spread
               else "The effect does NOT stand out of the spread."))
