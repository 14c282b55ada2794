"""Relative paths, the way users type them: resolved once at the command line, before any Ray
worker (which runs in another directory) can see them. The stages run as `miniplm` commands
from a fresh working directory with relative paths only in test_storage.py, beside the same
chain on s3://."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from miniplm import io
from miniplm.cli import build_parser, resolve

STAGE_ARGS = {
    "prepare": ["raw/a.jsonl", "raw/*.jsonl", "s3://bucket/raw", "--output", "work/instances"],
    "score": ["--instances", "work/instances", "--model", "ckpt/teacher", "--output", "work/scores/t"],
    "select": ["--instances", "work/instances", "--teacher", "work/scores/t", "--reference",
               "work/scores/r", "--output", "gs://bucket/refined"],
    "train-tokenizer": ["--instances", "work/instances", "--output", "work/tokenizer"],
    "eval": ["--model", "runs/s/final", "--data", "work/heldout", "--output", "runs/s/eval.json"],
    "report": ["runs/a", "file:///abs/runs/b", "--output", "runs/report"],
    "train": ["--set", "output=runs/s", "--set", "data.path=work/refined", "--set",
              "model.tokenizer=work/tokenizer", "--set", "eval.data=work/heldout", "--set", "steps=1"],
}


def path_values(cfg, prefix=""):
    """Every value of a `path=True` field of a (nested) config, with its dotted key."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if f.metadata.get("path"):
            for v in value if isinstance(value, list) else [value]:
                if v is not None:
                    yield key, v
        elif dataclasses.is_dataclass(value):
            yield from path_values(value, key + ".")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                yield from path_values(item, f"{key}[{i}].")


@pytest.mark.parametrize("command", sorted(STAGE_ARGS))
def test_every_path_is_made_absolute_at_the_command_line(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in ("ckpt/teacher", "work/tokenizer"):  # the user's checkpoints: a relative `org/name`
        (tmp_path / folder).mkdir(parents=True)       # that is no folder here is a Hub id (test_hub.py)
    cfg, _ = resolve(build_parser().parse_args([command, *STAGE_ARGS[command]]))
    values = dict(path_values(cfg))
    assert values, "no path fields found"
    typed = [a for a in STAGE_ARGS[command] if not a.startswith("-")]
    for key, value in path_values(cfg):
        if "://" in value:  # URLs pass unchanged
            assert value in " ".join(typed), (key, value)
        else:
            assert os.path.isabs(value) and value.startswith(str(tmp_path)), (key, value)


def test_pipeline_paths_are_absolute_and_keywords_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, _ = resolve(build_parser().parse_args(["demo", "--quick"]))
    assert cfg.output == str(tmp_path / "runs" / "demo")
    assert cfg.corpus.inputs == ["sample"]  # keywords, not paths
    assert cfg.teacher.checkpoint == cfg.tokenizer == "builtin"
    cfg, _ = resolve(build_parser().parse_args([
        "run", str(io.join(os.path.dirname(__file__), "..", "miniplm", "configs", "demo.yaml")),
        "--set", "output=out", "--set", "corpus.inputs=[data/x.jsonl]", "--set", "corpus.heldout=[h]"]))
    assert cfg.output == str(tmp_path / "out")
    assert cfg.corpus.inputs == [str(tmp_path / "data" / "x.jsonl")]
    assert cfg.corpus.heldout == [str(tmp_path / "h")]


def test_a_submitted_job_refuses_relative_paths(tmp_path, monkeypatch):
    """`ray job submit --working-dir .` runs the driver in Ray's copy of that folder: a relative
    output would be written there and lost, so it is refused, naming the key."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))
    args = build_parser().parse_args(["score", "--instances", "/data/instances", "--model", "/ckpt/t",
                                      "--output", "work/scores"])
    with pytest.raises(ValueError, match="output: 'work/scores' is a relative path, and this job runs"):
        resolve(args)
    absolute = build_parser().parse_args(["score", "--instances", "/data/instances", "--model",
                                          "s3://b/t", "--output", "/data/scores"])
    assert resolve(absolute)[0].output == "/data/scores"


REMOTE_CORPUS = ["s3://bucket/prefix/*.jsonl.zst", "hf://datasets/org/name/data/*.parquet"]


def test_corpus_urls_and_globs_are_never_rewritten(tmp_path, monkeypatch):
    """Corpora in object stores and on the Hub, named as users name them (globs included), keep
    every character through the path resolution of each place a corpus is named: `miniplm
    prepare`'s inputs, and a pipeline YAML's corpus.inputs and corpus.heldout as `miniplm run`
    and `miniplm plan` load it (the pipeline hands them to prepare as they are). Nothing here
    lists or opens them: resolution needs no network."""
    import yaml

    from miniplm.pipeline.plan import Plan, load_config
    from miniplm.pipeline.run import DEMO_CONFIG

    monkeypatch.chdir(tmp_path)
    cfg, _ = resolve(build_parser().parse_args(["prepare", *REMOTE_CORPUS, "local/*.jsonl",
                                                "--output", "work/instances"]))
    assert cfg.inputs == [*REMOTE_CORPUS, str(tmp_path / "local" / "*.jsonl")]  # a local glob: absolute

    with open(DEMO_CONFIG) as f:
        values = yaml.safe_load(f)
    values["corpus"] = {"inputs": REMOTE_CORPUS, "heldout": REMOTE_CORPUS[::-1]}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(values))
    cfg, _ = resolve(build_parser().parse_args(["run", "pipeline.yaml"]))
    plan = Plan(config="pipeline.yaml", output=None, tflops=1.0)
    planned, _ = load_config("pipeline.yaml", [], plan)
    for pipeline in (cfg, planned):
        assert pipeline.corpus.inputs == REMOTE_CORPUS
        assert pipeline.corpus.heldout == REMOTE_CORPUS[::-1]
        assert pipeline.output == str(tmp_path / "runs" / "demo")
    assert not plan.problems
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline.yaml"]  # nothing made for a URL
