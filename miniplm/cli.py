"""`miniplm <stage> ...`: one subcommand per stage, flags generated from the stage's config."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Callable

from miniplm import __version__, console
from miniplm.config import absolute_paths, add_arguments, from_namespace


def _stages() -> dict[str, tuple[type, Callable, str]]:
    from miniplm.data.prepare import PrepareConfig, run_prepare
    from miniplm.data.tokenizer import TokenizerConfig, run_train_tokenizer
    from miniplm.evaluation.evaluate import EvalConfig, run_eval
    from miniplm.evaluation.report import ReportConfig, run_report
    from miniplm.scoring.score import ScoreConfig, run_score
    from miniplm.selection.select import SelectConfig, run_select

    return {
        "prepare": (PrepareConfig, run_prepare, "raw corpus -> instances dataset"),
        "score": (ScoreConfig, run_score, "instances + causal LM -> score table"),
        "select": (SelectConfig, run_select, "instances + teacher/reference tables -> refined corpus"),
        "train-tokenizer": (TokenizerConfig, run_train_tokenizer, "instances -> a BPE tokenizer"),
        "eval": (EvalConfig, run_eval, "checkpoint + held-out instances (+ lm-eval tasks) -> eval JSON"),
        "report": (ReportConfig, run_report, "training runs -> table, loss-vs-FLOPs plot, compute saving"),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="miniplm", description=(
        "MiniPLM on Ray: score a corpus with a teacher and a reference LM, keep the instances "
        "the teacher knows much better (Difference Sampling), pre-train students on them."))
    parser.add_argument("--version", action="version", version=f"miniplm {__version__}")
    # accepted before or after the command: `miniplm --verbose demo` and `miniplm demo --verbose`
    common = argparse.ArgumentParser(add_help=False)
    for p in (parser, common):
        default = False if p is parser else argparse.SUPPRESS
        p.add_argument("--verbose", action="store_true", default=default,
                       help="also print each stage's resolved config and Ray's own logs")
        p.add_argument("--debug", action="store_true", default=default,
                       help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = functools.partial(sub.add_parser, parents=[common])
    for name, (cls, _, help_text) in _stages().items():
        p = command(name, help=help_text, description=help_text)
        add_arguments(p, cls)
        p.add_argument("--address", help="Ray cluster to use (default: RAY_ADDRESS, a running "
                                         "local cluster, or a new in-process one)")
    train = command("train", help="pre-train a causal LM on an instances dataset (Ray Train)",
                           description="pre-train a causal LM on an instances dataset (Ray Train); "
                                       "every config key can be set or overridden with --set")
    train.add_argument("--config", help="YAML file with the TrainConfig (see jobs/configs/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="dotted override, e.g. --set data.seq_len=512 tokens=1e6 (repeatable)")
    train.add_argument("--address", help="Ray cluster to use")
    run = command("run", help="the whole pipeline from one YAML (skips finished steps)")
    run.add_argument("config", help="pipeline YAML (see miniplm/configs/demo.yaml, jobs/configs/pile-qwen.yaml)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="dotted override, e.g. --set selection.alpha=0.3 (repeatable)")
    run.add_argument("--address", help="Ray cluster to use")
    run.add_argument("--dry-run", action="store_true", help="print the plan (see `miniplm plan`) and exit, "
                                                           "doing no work")
    run.add_argument("--tflops", type=float, default=200.0, help="with --dry-run: achieved TFLOP/s per GPU "
                                                                 "for GPU-hours (default: 200)")
    plan = command("plan", help="resolve and check a pipeline YAML, print its steps, FLOPs, GPU-hours "
                                       "and disk; writes nothing",
                          description="Resolve every input of a pipeline YAML (the one `miniplm run` takes) "
                                      "without doing any work or writing anything: files listed and sized, model "
                                      "configs and tokenizers read (never a Hub model's weights), the corpus's "
                                      "tokens estimated from its first documents. Prints each step (runs or "
                                      "reused), the teacher's and reference's forward FLOPs over the pool, the "
                                      "students' training FLOPs, GPU-hours, disk, and every problem it sees, "
                                      "naming its config key. Exit status 2 when a problem would fail the run.")
    plan.add_argument("config", help="pipeline YAML (see miniplm/configs/demo.yaml, jobs/configs/pile-qwen.yaml)")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="dotted override, as `miniplm run` takes it (repeatable)")
    plan.add_argument("--address", help="Ray cluster the run will use (not contacted: local paths are "
                                        "flagged, as every node of a multi-node cluster must see them)")
    plan.add_argument("--tflops", type=float, default=200.0,
                      help="achieved TFLOP/s per GPU for GPU-hours (default: 200, bf16 on an H100 at ~20%% "
                           "of peak; measure yours with jobs/bench_score.py)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    demo = command("demo", help="the whole pipeline on a built-in sample corpus with tiny models")
    demo.add_argument("--quick", action="store_true", help="a smoke version (a few minutes on 2 CPUs)")
    demo.add_argument("--with-kd", action="store_true", help="add a vanilla-KD student (the paper's "
                      "online-distillation baseline) at about the other students' total FLOPs")
    demo.add_argument("--output", default="runs/demo", help="run folder (default: runs/demo)")
    demo.add_argument("--address", help="Ray cluster to use")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console.set_verbose(args.verbose)
    if args.command == "plan" or getattr(args, "dry_run", False):
        return plan(args, parser)
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
    try:  # bad config fails before any work starts
        cfg, run = resolve(args)
    except ValueError as err:
        if args.debug:
            raise
        parser.error(f"{args.command}: {err}")
    try:
        run(cfg)
    except Exception as err:  # noqa: BLE001 (a bug's traceback is kept below)
        from ray.exceptions import RayError

        from miniplm.runtime import unwrap

        if args.debug or not isinstance(unwrap(err), (ValueError, OSError, RuntimeError, RayError)):
            raise
        print(f"miniplm {args.command}: error: {user_message(err)}", file=sys.stderr)
        return exit_code(err)
    return 0


def plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`miniplm plan` and `miniplm run --dry-run`: the plan printed; 2 when a problem would fail the run."""
    from miniplm.pipeline.plan import make_plan, render, to_json

    if not args.tflops > 0:
        parser.error(f"{args.command}: --tflops must be > 0, got {args.tflops}")
    result = make_plan(args.config, args.overrides, tflops=args.tflops,
                       address=args.address or os.environ.get("RAY_ADDRESS"))
    print(to_json(result) if getattr(args, "json", False) else render(result), flush=True)
    return result.exit_code


def exit_code(err: BaseException) -> int:
    """2 for what the user can fix in the command (a bad input, setting or output folder, a
    held output), 1 for a run that failed while working (storage, a lost worker)."""
    from miniplm.lease import OutputBusy
    from miniplm.runtime import unwrap

    inner = unwrap(err)
    return 2 if isinstance(inner, (ValueError, FileNotFoundError, NotADirectoryError, OutputBusy)) else 1


def resolve(args: argparse.Namespace) -> tuple[object, Callable]:
    """The command's config, with every local path made absolute, and the function to run it."""
    if args.command == "train":
        from miniplm.config import load
        from miniplm.training.train import TrainConfig, run_train

        cfg, run = load(TrainConfig, args.config, args.overrides), run_train
    elif args.command in ("run", "demo"):
        from miniplm.pipeline.run import demo_config, load_pipeline, run_pipeline

        cfg = (load_pipeline(args.config, args.overrides) if args.command == "run"
               else demo_config(args.output, quick=args.quick, with_kd=args.with_kd))
        run = run_pipeline
    else:
        cls, run, _ = _stages()[args.command]
        cfg = from_namespace(cls, args)
    # Ray workers run in other directories: no relative path may reach them
    return absolute_paths(cfg), run


def user_message(err: BaseException) -> str:
    """The message of the error a stage or one of its Ray workers raised. Ray appends its
    retry advice on further lines; our messages are one line."""
    from miniplm.runtime import unwrap

    inner = unwrap(err)
    return str(inner).split("\n")[0] if inner is not err else str(err)


if __name__ == "__main__":
    sys.exit(main())
