"""Is the demo's MiniPLM effect real? Train the demo's vanilla / MiniPLM student pair again with
several seeds on the demo's own corpora (its score tables and selections are reused) and print, per
seed and as mean ± sd, each student's held-out loss, the gain and the compute-saving factor.

    miniplm demo                                  # first: corpus, reference, score tables, selections
    python jobs/bench_demo.py [--output runs/demo] [--seeds 0 1 2 3 4 5] [--preset tiny] [--tokens 400000]

The defaults are the demo's own students (`tiny`, 400k tokens), so the table says whether the
demo's single run is to be believed. Runs on demand (about 15 minutes on 2 CPU cores with the
defaults); students already trained are reused, so a seed added later trains only its pair.
"""

from __future__ import annotations

import argparse

from miniplm.config import absolute_path
from miniplm.pipeline.run import saved_pipeline
from miniplm.studies.replicate import replicate, seeds_table, verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/demo", help="a finished demo (or pipeline) run folder (default: runs/demo)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--preset", default="tiny", help="student preset (default: tiny, the demo's)")
    parser.add_argument("--tokens", type=float, default=4e5, help="tokens per student (default: 400000, the demo's)")
    args = parser.parse_args()
    cfg = saved_pipeline(absolute_path(args.output))  # exactly the config that made the run
    results = replicate(cfg, args.seeds, args.preset, int(args.tokens))
    print(f"\nstudents: {args.preset}, {int(args.tokens):,} tokens each, seeds {args.seeds}\n")
    print(seeds_table(results))
    print("\n" + verdict(results))


if __name__ == "__main__":
    main()
