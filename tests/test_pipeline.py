"""run / demo: the whole pipeline end to end, reuse when a student is added, config errors."""

from __future__ import annotations

import math
import os
import re

import pyarrow.parquet as pq
import pytest
from conftest import read_metrics

from miniplm import io
from miniplm.demo import teacher as demo_teacher
from miniplm.demo.teacher import ASSET
from miniplm.models import model_fingerprint
from miniplm.pipeline.run import DEMO_CONFIG, demo_config, load_pipeline, run_pipeline


def read_parts(root) -> list[str]:
    return [p["name"] for p in io.read_json(os.path.join(root, io.MANIFEST))["parts"]]


def read_ids(root) -> list[str]:
    return sorted(i for name in read_parts(root) for i in pq.read_table(os.path.join(root, name))["id"].to_pylist())


@pytest.mark.timeout(900)
def test_demo_quick_end_to_end(demo_run):
    out, stdout = demo_run
    # it ends with the comparison table and the step table, and wrote where the user stands
    assert "| vanilla |" in stdout and "| miniplm |" in stdout and "Compute-saving factor" in stdout
    assert stdout.rstrip().splitlines()[-1].startswith("total")
    assert (out / "report" / "report.md").exists()
    summary = io.read_json(str(out / "report" / "report.json"))
    for path in ["instances", "heldout", "pool", "d_ref", "scores/teacher", "scores/reference",
                 "refined", "random"]:
        assert os.path.exists(out / path / io.MANIFEST), path
    # the built-in teacher scored, checked and named; nothing trained a teacher or a tokenizer
    assert "teacher: built in (mini, 2,500,000 tokens of D_ref, sha256 verified)" in stdout
    assert not (out / "teacher").exists() and not (out / "tokenizer").exists()
    for name in read_parts(out / "scores" / "teacher"):
        scored_by = io.read_parquet_metadata(str(out / "scores" / "teacher" / name))
        assert scored_by["model_fingerprint"] == model_fingerprint(ASSET)
    # the score tables join the instances they scored, one row each
    pool = read_ids(out / "pool")
    assert read_ids(out / "scores" / "teacher") == pool == read_ids(out / "scores" / "reference")
    refined, random = read_ids(out / "refined"), read_ids(out / "random")
    assert set(refined) <= set(pool) and len(refined) == len(random) == math.floor(0.5 * len(pool))
    assert not set(read_ids(out / "d_ref")) & set(pool)  # D_ref is held out from selection
    assert set(summary["runs"]) == {"vanilla", "miniplm"}
    for name, run in summary["runs"].items():
        assert math.isfinite(run["final_eval_loss"]) and math.isfinite(run["bits_per_byte"]), name
        assert os.path.exists(out / "students" / name / "final" / "config.json")
    assert (out / "report" / "loss_vs_flops.png").stat().st_size > 0
    assert "Compute-saving factor" in (out / "report" / "report.md").read_text()
    # and the claims benchmark's evaluation: the held-out split, a D_ref slice per source, outside prose
    by_set = io.read_json(str(out / "report" / "eval_sets.json"))
    assert [s["name"] for s in by_set["sets"]] == ["heldout", "docs", "code", "license", "outside-prose"]
    assert set(by_set["runs"]) == {"vanilla", "miniplm"}
    assert all(0 < bits < 10 for run in by_set["runs"].values() for bits in run.values())
    assert "Bits per byte on each evaluation set" in stdout


def test_the_demo_console_shows_steps_and_results_not_logs(demo_run):
    """The quick demo as a terminal shows it once its bars settle: a line per step and its
    summary, the tables; no resolved config, no Ray worker line, no Ray WARNING/ERROR line."""
    _, console = demo_run
    lines = console.rstrip("\n").split("\n")
    assert len(lines) <= 60, console
    assert [line for line in lines if line.startswith("[")] == [
        f"[{i}/15] {name}" for i, name in enumerate(
            ["sample corpus", "prepare corpus", "prepare held-out set", "split D_ref", "train reference",
             "score teacher", "score reference", "select refined", "select random", "train student vanilla",
             "eval student vanilla", "train student miniplm", "eval student miniplm", "report",
             "eval students per source"], 1)]
    assert not [line for line in lines if "pid=" in line or re.search(r"\b(WARNING|ERROR)\b|\] [EW] |\.cc:", line)]
    assert "PipelineConfig" not in console and "TrainConfig" not in console


@pytest.mark.timeout(600)
def test_an_added_kd_student_trains_alone_and_distils_from_the_teacher(demo_run, ray_session):
    """The vanilla-KD student of `miniplm demo --quick --with-kd`, added to the finished demo:
    only it trains (and is evaluated); every earlier step is reused, the score tables untouched."""
    out, _ = demo_run
    tables = {p: p.stat().st_mtime_ns for p in (out / "scores").rglob("*.parquet")}
    with_kd = demo_config(str(out), quick=True, with_kd=True)  # `miniplm demo --quick --with-kd`
    assert with_kd.students[2].name == "vanilla-kd" and with_kd.students[2].tokens == 16000
    assert with_kd.students[2].kd.teacher == "teacher" and with_kd.students[2].corpus == "random"
    log = {name: status for name, status, _ in run_pipeline(with_kd)["steps"]}
    assert log["train student vanilla-kd"] == "ran" and log["eval student vanilla-kd"] == "ran"
    assert "train teacher" not in log
    for name in ("prepare corpus", "split D_ref", "train reference", "score teacher",
                 "score reference", "select refined", "select random", "train student vanilla",
                 "train student miniplm", "eval student vanilla", "eval student miniplm"):
        assert log[name] == "reused", name
    assert {p: p.stat().st_mtime_ns for p in (out / "scores").rglob("*.parquet")} == tables

    train = io.read_json(str(out / "students" / "vanilla-kd" / "config.json"))["train"]
    assert train["kd"] == {"teacher": ASSET, "weight": 0.5, "temperature": 1.0}
    rows = read_metrics(out / "students" / "vanilla-kd")
    for r in rows:  # the loss it trained on mixes both, and both are logged
        assert r["loss"] == pytest.approx(0.5 * r["lm_loss"] + 0.5 * r["kd_loss"], abs=2e-6), r["step"]
        assert r["kd_loss"] > 0
    summary = io.read_json(str(out / "report" / "report.json"))
    kd, vanilla = summary["runs"]["vanilla-kd"], summary["runs"]["vanilla"]
    assert kd["teacher_flops"] > 0 and vanilla["teacher_flops"] == 0
    assert kd["flops"] == kd["student_flops"] + kd["teacher_flops"]
    assert "offline_teacher" in summary["runs"]["miniplm"] and "offline_teacher" not in vanilla


@pytest.mark.parametrize("override, message", [
    ("teacher={checkpoint: /no/such/ckpt}", "teacher.checkpoint: no HF checkpoint"),
    ("selection.alpha=1.5", "selection.alpha must be in"),
    ("selection.alpha=0", "selection.alpha must be in"),
    ("students[1].preset=enormous", "students\\[1\\].preset: unknown preset 'enormous'"),
    ("students[0].corpus=everything", "students\\[0\\].corpus"),
    ("reference.tokens=0", "reference.tokens"),
])
def test_config_errors_name_the_key(override, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        load_pipeline(DEMO_CONFIG, [f"output={tmp_path / 'never'}", override])
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("override, message", [
    ("reference.fraction=0.3", r"reference.fraction=0.3 would put text it trained on into the pool"),
    ("corpus.max_chars=500", r"corpus.max_chars=500 would put text"),
    ("tokenizer=null", r"tokenizer: the built-in teacher needs its own tokenizer"),
    ("reference.checkpoint=builtin", r"reference.checkpoint: `builtin` is the demo's teacher"),
    (f"reference.checkpoint={ASSET}", r"reference.checkpoint: with the built-in teacher on the sample corpus"),
])
def test_the_builtin_teacher_refuses_another_split_or_tokenizer(override, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        load_pipeline(DEMO_CONFIG, [f"output={tmp_path / 'never'}", override])
    assert not (tmp_path / "never").exists()


def test_the_builtin_teacher_is_checked_against_its_recorded_sha256(tmp_path):
    """A shipped checkpoint is trusted only as recorded: a changed or missing file is refused,
    naming it. The recorded hashes are recomputed here with hashlib."""
    import hashlib
    import shutil

    record = demo_teacher.provenance()
    for name, digest in record["files"].items():
        with open(os.path.join(ASSET, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, name
    assert record["command"] == "python jobs/build_demo_teacher.py"
    assert record["train"]["model"]["preset"] == "mini" and record["train"]["data"]["seq_len"] == 128
    copy = tmp_path / "teacher"
    shutil.copytree(ASSET, copy)
    assert demo_teacher.verified(str(copy)) == str(copy)
    with open(copy / "model.safetensors", "r+b") as f:  # one weight byte flipped
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    demo_teacher.verified.cache_clear()
    with pytest.raises(ValueError, match=r"teacher/model.safetensors: sha256 .* is not the .* recorded"):
        demo_teacher.verified(str(copy))
    shutil.copyfile(os.path.join(ASSET, "model.safetensors"), copy / "model.safetensors")
    (copy / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"teacher/tokenizer.json: missing"):
        demo_teacher.verified(str(copy))


def test_the_builtin_teacher_tells_how_the_run_corpus_relates_to_its_own():
    own = demo_teacher.provenance()["corpus"]["fingerprint"]
    assert f"This run's sample corpus is {own}: the same corpus." in demo_teacher.describe(own)
    assert "another corpus (other package versions" in demo_teacher.describe("0" * 16)
    assert "is not the sample corpus" in demo_teacher.describe(None)


def test_the_builtin_teacher_ships_in_the_wheel():
    """`pip install .` (not only `-e .`) must bring every file the demo checks."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["miniplm.demo"]  # the teacher's package
    shipped = sorted(os.listdir(ASSET))
    assert set(shipped) == {"provenance.json", *demo_teacher.provenance()["files"]}
    for name in shipped:
        assert any(fnmatch.fnmatch(f"assets/demo-teacher/{name}", p) for p in patterns), name


def test_sample_corpus_comes_from_the_base_install_only():
    """Two machines with the same Python and base install get the same corpus, whatever else
    is installed: the dev/eval extras here (pytest, moto, lm-eval) must not leak into it."""
    from packaging.requirements import Requirement

    from miniplm.demo.sample_corpus import _canonical, base_distributions

    names = {_canonical(d.metadata["Name"]) for d in base_distributions()}
    base = {_canonical(Requirement(r).name) for r in __import__("importlib.metadata").metadata
            .distribution("miniplm").requires if "extra ==" not in r}
    assert base <= names  # every base requirement, and what they pull in
    assert {"ray", "torch", "transformers", "pyarrow", "numpy", "fsspec"} <= names
    assert not names & {"pytest", "pytest-timeout", "moto", "lm-eval", "s3fs", "accelerate"}
    assert "miniplm" not in names  # its README changes with every release


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[dict, dict[str, list[str]]]:
    """The demo's sample corpus, written as the demo writes it: (manifest, texts per file name)."""
    import json

    from miniplm.demo.sample_corpus import write_sample_corpus

    out = tmp_path_factory.mktemp("sample")
    manifest = write_sample_corpus(str(out), max_bytes=2_000_000)
    return manifest, {f.name: [json.loads(line)["text"] for line in f.read_text().splitlines()]
                      for f in sorted(out.rglob("*.jsonl"))}


def test_sample_corpus_does_not_depend_on_where_the_venv_lives(sample):
    """Two fresh venvs at different paths gave two corpus fingerprints: RECORD files list the
    console scripts (`../../../bin/ray,sha256=...`), whose shebang holds the venv's path, so
    their hashes differ per venv. Nothing installed outside site-packages may enter the text."""
    import sys

    _, texts = sample
    noise = [t for name, file_texts in texts.items() if name.startswith("noise-") for t in file_texts]
    assert noise and all(",sha256=" in t for t in noise)  # RECORD files are still the noise
    assert not [line for t in noise for line in t.splitlines() if line.startswith("../")]
    assert not [t for file_texts in texts.values() for t in file_texts if sys.prefix in t]


def test_sample_corpus_keeps_one_copy_of_each_text(sample):
    """Most base packages ship the same MIT or Apache license with another copyright line. A
    teacher trained on D_ref memorised those copies, and the difference score then kept the
    pool's copies for being memorised: 76 of the pool's 92 license instances had a twin in
    D_ref, and all 76 were kept. Each text is now taken once, and the copies are counted."""
    manifest, texts = sample

    def words(text: str) -> tuple[str, ...]:
        return tuple(w for line in text.lower().splitlines() if "copyright" not in line for w in line.split())

    every = [t for file_texts in texts.values() for t in file_texts]  # training and held-out
    assert len({words(t) for t in every}) == len(every)
    licenses = [t for name, file_texts in texts.items() if name.startswith("license-") for t in file_texts]
    assert sum("Permission is hereby granted, free of charge" in t for t in licenses) >= 1  # still there, in its distinct wordings
    assert manifest["copies_dropped"]["license"] > 0  # this install ships copies of a license
    assert sum(len(t.encode()) for t in licenses) == manifest["bytes"]["license"] > 0


def test_students_take_kd_and_a_step_budget(tmp_path):
    cfg = load_pipeline(DEMO_CONFIG, [f"output={tmp_path / 'never'}",
                                      "students[2]={name: kd, corpus: random, steps: 25, "
                                      "kd: {teacher: teacher, weight: 0.3}}"])
    kd = cfg.students[2]
    assert kd.steps == 25 and kd.tokens is None
    assert kd.kd.teacher == "teacher" and kd.kd.weight == 0.3 and kd.kd.temperature == 1.0
    with pytest.raises(ValueError, match=r"students\[0\]: give exactly one budget"):
        load_pipeline(DEMO_CONFIG, [f"output={tmp_path / 'never'}", "students[0].steps=10"])
    assert not (tmp_path / "never").exists()


def test_kd_teacher_with_another_tokenizer_is_refused_at_config_time(tmp_path, tokenizer_dir, gpt2_eos_only_dir):
    with pytest.raises(ValueError, match=r"students\[0\]\.kd\.teacher: .* another tokenizer"):
        load_pipeline(DEMO_CONFIG, [f"output={tmp_path / 'never'}", f"tokenizer={tokenizer_dir}",
                                    "teacher={preset: mini, tokens: 1000}",
                                    f"students[0].kd={{teacher: {gpt2_eos_only_dir}}}"])


def test_pile_qwen_config_shows_the_papers_four_arms():
    import yaml

    from miniplm.config import build
    from miniplm.pipeline.run import StudentSpec

    path = os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "pile-qwen.yaml")
    with open(path) as f:
        students = [build(StudentSpec, s) for s in yaml.safe_load(f)["students"]]
    for size, kd_steps in [("200m", 25_000), ("500m", 45_000), ("1.2b", 65_000)]:
        arms = {(s.corpus, s.kd is not None, s.steps) for s in students if s.preset == f"qwen-{size}"}
        assert arms == {("full", False, 100_000), ("full", True, kd_steps),
                        ("refined", False, 100_000), ("refined", True, kd_steps)}, size
    assert all(s.kd.teacher == "teacher" and s.kd.weight == 0.5 for s in students if s.kd)
