"""`miniplm plan` and `miniplm run --dry-run`: a pipeline YAML resolved, checked and costed before
any work, writing nothing and starting no Ray. FLOPs are checked against the accounting of
miniplm/training/flops.py computed here from the models' architecture numbers."""

from __future__ import annotations

import gzip
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
from conftest import train_tokenizer
from test_hub import write_hub_cache

from miniplm.cli import main
from miniplm.pipeline.run import DEMO_CONFIG

PILE_QWEN = str(pathlib.Path(__file__).resolve().parent.parent / "jobs" / "configs" / "pile-qwen.yaml")
TEACHER = "Qwen/Qwen1.5-1.8B"
# Qwen1.5-1.8B's architecture, as its config.json on the Hub gives it
QWEN_1_8B = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=2048, intermediate_size=5504,
                 num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, vocab_size=151936,
                 max_position_embeddings=32768, tie_word_embeddings=False)
# a ~104M Qwen, the paper's reference
QWEN_104M = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=512, intermediate_size=1408,
                 num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, vocab_size=151936,
                 max_position_embeddings=2048, tie_word_embeddings=True)
QWEN_200M = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12)  # miniplm's qwen-200m preset (models.PRESETS)
TFLOPS = 200e12


def matmul_params(c: dict, vocab: int) -> int:
    """Qwen2's weights a token is multiplied by: q/k/v (with biases), o, the gated MLP, two
    norms per layer, the final norm and the LM head (tied or not); no embedding lookup."""
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    attention = (h * h + h) + 2 * (h * kv + kv) + h * h
    return layers * (attention + 3 * h * i + 2 * h) + h + vocab * h


def forward_per_token(c: dict, vocab: int, context: int) -> int:
    return 2 * matmul_params(c, vocab) + 4 * c["num_hidden_layers"] * c["hidden_size"] * context


def training_per_token(c: dict, vocab: int, context: int) -> int:
    return 6 * matmul_params(c, vocab) + 12 * c["num_hidden_layers"] * c["hidden_size"] * context


def checkpoint(folder: pathlib.Path, config: dict, tokenizer_dir: pathlib.Path) -> pathlib.Path:
    """A checkpoint folder as plan sees it: config.json, the tokenizer, and a weights file
    (empty: plan checks it is there and never reads it)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    for file in tokenizer_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def corpus(documents, tmp_path_factory) -> tuple[pathlib.Path, list[str]]:
    """150 documents shorter than pile-qwen's max_chars (one instance each), in a .jsonl and a
    .jsonl.gz shard, and a held-out file."""
    root = tmp_path_factory.mktemp("pile")
    docs = [d for d in documents if len(d) < 4000][:150]
    (root / "train").mkdir()
    lines = [json.dumps({"text": d, "meta": {"pile_set_name": "stdlib"}}) + "\n" for d in docs]
    (root / "train" / "pile-00.jsonl").write_text("".join(lines[:75]))
    with gzip.open(root / "train" / "pile-01.jsonl.gz", "wt") as f:
        f.write("".join(lines[75:]))
    (root / "val.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[150:160]))
    return root, docs


def pile_overrides(root: pathlib.Path, output: pathlib.Path, reference: pathlib.Path | None) -> list[str]:
    """pile-qwen.yaml on the test corpus; with `reference`, that checkpoint instead of training one."""
    return ["--set", f"output={output}", "--set", f"corpus.inputs={json.dumps([str(root / 'train' / '*')])}",
            "--set", f"corpus.heldout={json.dumps([str(root / 'val.jsonl')])}",
            *(["--set", f"reference.checkpoint={reference}"] if reference else [])]


def plan_json(capsys, argv: list[str]) -> tuple[int, dict]:
    code = main(argv + ["--json"])
    return code, json.loads(capsys.readouterr().out)


def no_ray(*args, **kwargs):
    raise AssertionError("plan started or attached to Ray")


def test_plan_of_the_demo_lists_every_step_and_writes_nothing(tmp_path, capsys, monkeypatch):
    out, cache = tmp_path / "demo", tmp_path / "miniplm-cache"
    monkeypatch.setenv("MINIPLM_CACHE", str(cache))  # where a remote file's local copy would go
    # any start of (or attach to) Ray fails the test, whether or not this session's Ray is up
    import miniplm.runtime

    monkeypatch.setattr(miniplm.runtime, "init_ray", no_ray)
    monkeypatch.setattr("ray.init", no_ray)
    code, plan = plan_json(capsys, ["plan", DEMO_CONFIG, "--set", f"output={out}"])
    assert code == 0 and plan["exit_code"] == 0
    # the steps pipeline.run_pipeline runs for the demo, in its order
    assert [(s["name"], s["status"]) for s in plan["steps"]] == [(name, "runs") for name in [
        "sample corpus", "prepare corpus", "prepare held-out set", "split D_ref", "train reference",
        "score teacher", "score reference", "select refined", "select random", "train student vanilla",
        "eval student vanilla", "train student miniplm", "eval student miniplm", "report",
        "eval students per source"]]
    assert not any(p["fatal"] for p in plan["problems"])
    # the sample corpus is described as the run will write it: the same documents and bytes
    from miniplm.demo.sample_corpus import write_sample_corpus

    manifest = write_sample_corpus(str(tmp_path / "sample"), max_bytes=2_000_000)
    capsys.readouterr()  # (its summary line)
    written = [json.loads(line)["text"] for f in sorted((tmp_path / "sample" / "train").iterdir())
               for line in f.read_text().splitlines()]
    assert plan["corpus"]["stored_bytes"] == sum(v for k, v in manifest["bytes"].items() if k != "heldout")
    assert plan["corpus"]["text_bytes"] == sum(len(t.encode()) for t in written)
    assert plan["corpus"]["documents"] == len(written) and plan["corpus"]["exact"]
    costs = {c["step"]: c for c in plan["costs"]}
    # a token budget is trained in whole steps of train.batch_tokens (4096 here), as the loop counts it
    assert costs["score teacher"]["flops"] > 0
    assert costs["train student miniplm"]["tokens"] == math.ceil(400_000 / 4096) * 4096

    # `run --dry-run` prints the same plan and exits the same way, doing nothing
    assert main(["plan", DEMO_CONFIG, "--set", f"output={out}"]) == 0
    printed = capsys.readouterr().out
    assert main(["run", DEMO_CONFIG, "--set", f"output={out}", "--dry-run"]) == 0
    assert capsys.readouterr().out == printed
    for line in ("score teacher", "FLOPs", "GPU-hours", "problems: 0 that would fail the run"):
        assert line in printed
    assert max(map(len, printed.splitlines())) <= 110
    assert not out.exists() and not cache.exists()


def test_a_finished_step_shows_as_reused(tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "instances").mkdir(parents=True)
    (out / "pipeline.json").write_text("{}")  # a folder `run` made
    (out / "instances" / "_manifest.json").write_text("{}")
    code, plan = plan_json(capsys, ["plan", DEMO_CONFIG, "--set", f"output={out}"])
    status = {s["name"]: s["status"] for s in plan["steps"]}
    assert code == 0 and status["prepare corpus"] == "reused" and status["split D_ref"] == "runs"
    assert sorted(p.name for p in out.rglob("*")) == ["_manifest.json", "instances", "pipeline.json"]


@pytest.mark.timeout(300)
def test_plan_of_pile_qwen_with_the_teacher_from_a_hub_cache(corpus, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    root, docs = corpus
    home = tmp_path / "hf"
    commit = write_hub_cache(home, TEACHER, checkpoint(tmp_path / "snapshot", QWEN_1_8B, tokenizer_dir), "qwen")
    reference = checkpoint(tmp_path / "qwen-104m", QWEN_104M, tokenizer_dir)
    out = tmp_path / "run"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HF_")},
           "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": "1"}
    argv = ["plan", PILE_QWEN, *pile_overrides(root, out, reference), "--json"]
    done = subprocess.run([sys.executable, "-m", "miniplm.cli", *argv], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    plan = json.loads(done.stdout)
    assert not out.exists()
    snapshot = str(home / "hub" / "models--Qwen--Qwen1.5-1.8B" / "snapshots" / commit)
    assert plan["models"]["teacher.checkpoint"] == snapshot and plan["models"]["tokenizer"] == snapshot
    assert [p["key"] for p in plan["problems"] if p["fatal"]] == []
    # 100K-step students on 150 documents repeat them: warned about, not fatal
    assert {p["key"] for p in plan["problems"]} == {f"students[{i}].steps" for i in range(12)}
    names = [s["name"] for s in plan["steps"]]
    assert names[:5] == ["prepare corpus", "prepare held-out set", "score teacher", "score reference", "select refined"]
    assert "split D_ref" not in names and "train tokenizer" not in names and len(names) == 5 + 24 + 1

    # the estimate: every document read, one instance each, tokenised by the teacher's tokenizer as
    # the run loads it from the snapshot (beside a qwen2 config.json, transformers makes it a
    # Qwen2Tokenizer: Qwen's pre-tokenizer, 513 ids)
    tok = AutoTokenizer.from_pretrained(snapshot)
    tokens = sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs)
    assert plan["corpus"]["tokens"][snapshot] == pytest.approx(tokens, rel=1e-9)
    assert plan["corpus"]["instances"] == len(docs) and plan["corpus"]["exact"]

    costs = {c["step"]: c for c in plan["costs"]}
    context = int(min(32768, tokens / len(docs)))  # attention over the mean instance
    teacher = costs["score teacher"]
    assert teacher["context"] == context and teacher["params"] == matmul_params(QWEN_1_8B, 151936) == 1_525_663_744
    assert teacher["flops"] == pytest.approx(forward_per_token(QWEN_1_8B, 151936, context) * tokens, rel=1e-9)
    assert teacher["gpu_hours"] == pytest.approx(teacher["flops"] / TFLOPS / 3600, rel=1e-9)
    step = next(s for s in plan["steps"] if s["name"] == "score teacher")
    assert step["flops"] == teacher["flops"] and step["gpu_hours"] == teacher["gpu_hours"]
    reference_flops = forward_per_token(QWEN_104M, 151936, int(min(2048, tokens / len(docs)))) * tokens
    assert costs["score reference"]["flops"] == pytest.approx(reference_flops, rel=1e-9)

    # a vanilla-KD student: its own training plus the online teacher's forward, per training token
    kd = costs["train student kd-200m"]
    per_token = training_per_token(QWEN_200M, len(tok), 1024) + forward_per_token(QWEN_1_8B, 151936, 1024)
    assert kd["tokens"] == 25000 * 524288
    assert kd["flops"] == pytest.approx(per_token * 25000 * 524288, rel=1e-9)
    assert kd["gpu_hours"] == pytest.approx(kd["flops"] / TFLOPS / 3600, rel=1e-9)
    # its disk: the final fp32 weights and the 2 latest checkpoints (fp32 weights + AdamW's two moments)
    # of a tied-embedding model, every parameter once; its token cache is vanilla-200m's (same corpus)
    disk = {s["name"]: s["disk_bytes"] for s in plan["steps"]}
    assert disk["train student kd-200m"] == matmul_params(QWEN_200M, len(tok)) * (4 + 2 * 12)

    # as shipped, the YAML trains its 104M reference on D_ref: 5% of the corpus split off first
    argv = ["plan", PILE_QWEN, *pile_overrides(root, out, None), "--json"]
    done = subprocess.run([sys.executable, "-m", "miniplm.cli", *argv], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    plan = json.loads(done.stdout)
    names = [s["name"] for s in plan["steps"]]
    assert names[:4] == ["prepare corpus", "prepare held-out set", "split D_ref", "train reference"]
    train_reference = {c["step"]: c for c in plan["costs"]}["train reference"]
    qwen_104m = {k: QWEN_104M[k] for k in QWEN_200M}  # the qwen-104m preset: QWEN_104M's shape
    trained = math.ceil(5e9 / 524288) * 524288  # whole steps of pile-qwen's batch_tokens
    assert train_reference["tokens"] == trained
    assert train_reference["flops"] == pytest.approx(training_per_token(qwen_104m, len(tok), 1024) * trained, rel=1e-9)


def test_missing_inputs_and_checkpoint_are_each_named(corpus, tmp_path, capsys):
    root, _ = corpus
    out = tmp_path / "run"
    inputs = [str(tmp_path / "missing.jsonl"), str(tmp_path / "nothing" / "*.jsonl"), str(root / "train" / "*")]
    code, plan = plan_json(capsys, ["plan", DEMO_CONFIG, "--set", f"output={out}",
                                    "--set", f"corpus.inputs={json.dumps(inputs)}",
                                    "--set", f"corpus.heldout={json.dumps([str(root / 'val.jsonl')])}",
                                    "--set", f"reference.checkpoint={tmp_path / 'no-checkpoint'}"])
    assert code == 2
    keys = {p["key"] for p in plan["problems"] if p["fatal"]}
    assert keys == {"corpus.inputs[0]", "corpus.inputs[1]", "reference.checkpoint"}
    assert not out.exists()


def test_teacher_and_reference_tokenizers_differ_under_token_normalisation(corpus, documents, tokenizer_dir,
                                                                           tmp_path, capsys):
    root, _ = corpus
    teacher = checkpoint(tmp_path / "teacher", QWEN_1_8B, tokenizer_dir)
    other = train_tokenizer(documents[:50], tmp_path / "other-tokenizer", vocab_size=300)
    reference = checkpoint(tmp_path / "reference", QWEN_104M, other)
    out = tmp_path / "run"
    argv = ["plan", PILE_QWEN, *pile_overrides(root, out, reference), "--set", f"teacher.checkpoint={teacher}",
            "--set", f"tokenizer={teacher}"]
    assert main(argv) == 2
    printed = capsys.readouterr().out
    assert "error: selection.normalize: token, but the teacher's tokenizer" in printed
    assert not out.exists()
    # per-byte normalisation compares them: nothing fails
    code, plan = plan_json(capsys, argv + ["--set", "selection.normalize=byte"])
    assert code == 0 and not [p for p in plan["problems"] if p["fatal"]]
    # a vanilla-KD student with a tokenizer other than its teacher's fails before any work
    code, plan = plan_json(capsys, argv + ["--set", "selection.normalize=byte", "--set",
                                           f"students[1].tokenizer={other}"])
    assert code == 2 and [p["key"] for p in plan["problems"] if p["fatal"]] == ["students[1].kd.teacher"]
    assert not out.exists()


def test_a_remote_checkpoint_is_costed_from_its_config_and_never_copied(corpus, tokenizer_dir, tmp_path,
                                                                      capsys, monkeypatch):
    """A reference on object storage (fsspec's in-memory store stands in for s3://): its config is
    read in memory, its tokenizer is not loaded (that would copy the folder), and nothing lands in
    miniplm's cache."""
    import fsspec

    root, _ = corpus
    cache = tmp_path / "miniplm-cache"
    monkeypatch.setenv("MINIPLM_CACHE", str(cache))
    teacher = checkpoint(tmp_path / "teacher", QWEN_1_8B, tokenizer_dir)
    memory, remote = fsspec.filesystem("memory"), f"/plan-test-{tmp_path.name}/reference"
    for file in checkpoint(tmp_path / "reference", QWEN_104M, tokenizer_dir).iterdir():
        memory.pipe(f"{remote}/{file.name}", file.read_bytes())
    argv = ["plan", PILE_QWEN, *pile_overrides(root, tmp_path / "run", f"memory://{remote}"),
            "--set", f"teacher.checkpoint={teacher}", "--set", f"tokenizer={teacher}"]
    try:
        code, plan = plan_json(capsys, argv)
    finally:
        memory.rm(remote.rsplit("/", 1)[0], recursive=True)
    assert code == 0 and not cache.exists()
    warned = {p["key"]: p["message"] for p in plan["problems"] if not p["fatal"]}
    assert "is remote" in warned["reference.checkpoint"]
    costs = {c["step"]: c for c in plan["costs"]}
    assert costs["score reference"]["params"] == matmul_params(QWEN_104M, 151936)
    assert costs["score reference"]["tokens"] == pytest.approx(plan["corpus"]["text_bytes"] / 4)
