"""The paper's claims in miniature, each with seeds: C1-C7 of `miniplm.studies.claims` on a finished demo
(or pipeline) run, whose corpus, score tables and selections are reused.

    miniplm demo                                   # first: corpus, reference, score tables, selections
    python jobs/bench_claims.py [--output runs/demo] [--claims C1 ... C7] [--seeds 0 1 2 3 4]

Prints, per arm, bits per byte on each evaluation set (mean ± sd over seeds), per claim the
gain, the seeds in which it holds and a verdict; writes OUTPUT/claims/report-TOKENS/claims.{md,json,png}.
Students already trained are reused, so a seed added later trains only its arms. `--quick`:
2 seeds, 64 steps of 1024 tokens per LM-only student (the suite runs it on the quick demo).

Measured on 2 CPU cores with the defaults: C1-C5 (35 students) 25 minutes, then C6-C7 (18 more;
C1's tiny students are reused) 17 minutes. Results: jobs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse

from miniplm.config import absolute_path
from miniplm.studies.claims import ALL_CLAIMS, StudyConfig, run_study, tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/demo", help="a finished demo (or pipeline) run folder")
    parser.add_argument("--claims", nargs="+", default=list(ALL_CLAIMS), help="claims to check (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds of C1-C5")
    parser.add_argument("--scaling-seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of C6-C7")
    parser.add_argument("--tokens", type=float, default=4e5, help="tokens per LM-only student (default: the demo's)")
    parser.add_argument("--quick", action="store_true", help="2 seeds, few steps: a smoke run")
    args = parser.parse_args()
    cfg = StudyConfig(run=absolute_path(args.output), claims=args.claims, seeds=args.seeds,
                      scaling_seeds=args.scaling_seeds, tokens=int(args.tokens))
    if args.quick:
        cfg = StudyConfig(run=cfg.run, claims=cfg.claims, seeds=[0, 1], scaling_seeds=[0, 1], tokens=65536,
                          batch_tokens=1024, eval_every=16, eval_bytes=8000)
    summary = run_study(cfg)
    print("\n" + tables(summary))


if __name__ == "__main__":
    main()
