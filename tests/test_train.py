"""train: loss goes down, DDP keeps replicas equal, resume continues the same curve,
the final checkpoint is a standard HF model the score stage reads, bad configs fail early."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import kill_tree, ray_worker_pids, write_jsonl
from transformers import AutoModelForCausalLM, LlamaConfig

from miniplm.config import load
from miniplm.prepare import PrepareConfig, run_prepare
from miniplm.score import ScoreConfig, run_score
from miniplm.train import TrainConfig, run_train


@pytest.fixture(scope="module")
def corpus(documents, tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("train_corpus")
    write_jsonl(root / "raw" / "a.jsonl", [{"text": d} for d in documents[0::2]])
    write_jsonl(root / "raw" / "b.jsonl", [{"text": d} for d in documents[1::2]])
    run_prepare(PrepareConfig(inputs=[str(root / "raw")], output=str(root / "inst"),
                              max_chars=1000, rows_per_part=100))
    return root / "inst"


def config(corpus, tokenizer_dir, output, *overrides) -> TrainConfig:
    base = [f"output={output}", f"data.path={corpus}", f"model.tokenizer={tokenizer_dir}",
            "model.preset=tiny", "data.seq_len=64", "micro_batch=8", "batch_tokens=512",
            "optim.lr=3e-3", "optim.warmup_steps=5", "cpus_per_worker=1"]
    return load(TrainConfig, None, base + list(overrides))


def metrics(output) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(output, "metrics.jsonl"))]


def run_settings(corpus) -> list[str]:
    """The run every training test shares: uninterrupted once (`clean_run`), and killed twice.
    Killed at the first registered checkpoint (step 20), it still has 140 steps (~4 s) to go,
    so the kill lands mid-run; 160 steps also cross a pass over the corpus (1,062 sequences)."""
    return [f"steps={STEPS}", "checkpoint_every=20", "keep_checkpoints=3",
            f"eval.data={corpus}", "eval.every=20", "eval.max_sequences=16"]


STEPS = 160


@pytest.fixture(scope="module")
def clean_run(corpus, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean_run")
    run_train(config(corpus, tokenizer_dir, out, *run_settings(corpus)))
    return out


@pytest.mark.timeout(600)
def test_loss_drops_and_final_checkpoint_scores(corpus, clean_run, tmp_path):
    out = clean_run
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert first > 5.5  # ~ln(vocab) at init
    assert last < first - 0.8, (first, last)  # ~6.2 at init
    assert rows[-1]["tokens"] == STEPS * 512 and rows[-1]["passes"] == 1
    assert all(0 < r["mfu"] < 1 and r["tokens_per_s"] > 0 and r["lr"] > 0 for r in rows)
    assert rows[19]["eval_loss"] > rows[-1]["eval_loss"]
    assert rows[10]["lr"] > rows[-1]["lr"] == pytest.approx(3e-3 * 0.1)  # cosine to the floor

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.vocab_size == len(__import__("transformers").AutoTokenizer.from_pretrained(out / "final"))
    scores = run_score(ScoreConfig(instances=str(corpus), model=str(out / "final"),
                                   output=str(tmp_path / "scores"), cpus_per_worker=0.5))
    assert scores["rows"] > 0 and scores["mean_logprob_per_token"] > -rows[0]["loss"]


@pytest.mark.timeout(600)
def test_two_ddp_workers_stay_in_sync(corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "ddp"
    run_train(config(corpus, tokenizer_dir, out, "steps=3", "num_workers=2", "cpus_per_worker=0.5",
                     "micro_batch=4", "checkpoint_every=3"))
    row = metrics(out)[-1]
    sums = row["replica_param_sums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert row["tokens"] == 3 * 512


def registered_checkpoints(out) -> str:
    """Ray Train's record of the checkpoints its controller has registered: a checkpoint
    folder exists a moment before that, and only a registered one is restored."""
    snapshot = out / "ray" / "checkpoint_manager_snapshot.json"
    return snapshot.read_text() if snapshot.exists() else ""


def wait_for_checkpoint(out, name: str, alive, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while name not in registered_checkpoints(out) and time.time() < deadline and alive():
        time.sleep(0.05)
    assert name in registered_checkpoints(out), f"{name} never registered in {out}"


def assert_same_curve(resumed: list[dict], reference: list[dict]) -> None:
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(resumed, reference):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5), a["step"]
        assert a["tokens"] == b["tokens"] and a["lr"] == pytest.approx(b["lr"])
        assert ("eval_loss" in a) == ("eval_loss" in b), a["step"]
        if "eval_loss" in b:
            assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4), a["step"]


def assert_restored_once(rows: list[dict], at_least: int) -> None:
    """One restore, from a checkpoint (not step 0), marked on the first step it re-did."""
    restored = [r for r in rows if "resumed_from" in r]
    assert len(restored) == 1, restored
    assert restored[0]["resumed_from"] >= at_least
    assert restored[0]["step"] == restored[0]["resumed_from"] + 1


@pytest.mark.timeout(900)
def test_killed_run_resumes_on_the_same_curve(corpus, tokenizer_dir, clean_run, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "miniplm.cli", "train"]
    for o in config_overrides(corpus, tokenizer_dir, out) + run_settings(corpus):
        args += ["--set", o]
    env = dict(os.environ, RAY_ADDRESS="local")  # its own Ray, so the kill takes all of it
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_checkpoint(out, "step-00000020", alive=lambda: proc.poll() is None)
    kill_tree(proc.pid)  # the whole run: driver, the Ray it started and its workers
    proc.wait()
    assert not (out / "final").exists()

    run_train(config(corpus, tokenizer_dir, out, *run_settings(corpus)))
    resumed = metrics(out)
    assert_restored_once(resumed, at_least=20)
    assert_same_curve(resumed, metrics(clean_run))


@pytest.mark.timeout(900)
def test_killed_worker_restores_the_last_checkpoint_and_finishes(corpus, tokenizer_dir, clean_run,
                                                                 tmp_path):
    out = tmp_path / "worker_killed"
    cfg = config(corpus, tokenizer_dir, out, *run_settings(corpus), "max_failures=1")
    outcome: dict = {}

    def train():
        try:
            outcome["summary"] = run_train(cfg)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=train)
    thread.start()
    wait_for_checkpoint(out, "step-00000020", alive=thread.is_alive)
    (pid,) = ray_worker_pids("RayTrainWorker")
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    assert (out / "final" / "config.json").exists()
    rows = metrics(out)
    assert_restored_once(rows, at_least=20)
    assert pid not in ray_worker_pids("RayTrainWorker")
    assert_same_curve(rows, metrics(clean_run))


def config_overrides(corpus, tokenizer_dir, output) -> list[str]:
    return [f"output={output}", f"data.path={corpus}", f"model.tokenizer={tokenizer_dir}",
            "model.preset=tiny", "data.seq_len=64", "micro_batch=8", "batch_tokens=512",
            "optim.lr=3e-3", "optim.warmup_steps=5", "cpus_per_worker=1"]


def test_bad_configs_fail_before_work(corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="model.preset: unknown preset 'giant'"):
        config(corpus, tokenizer_dir, out, "model.preset=giant", "steps=1")
    with pytest.raises(ValueError, match="tokens: the budget must be > 0"):
        config(corpus, tokenizer_dir, out, "tokens=0")
    with pytest.raises(ValueError, match="unknown config key optim.learning_rate"):
        config(corpus, tokenizer_dir, out, "optim.learning_rate=1", "steps=1")
    with pytest.raises(ValueError, match="model.tokenizer: no tokenizer folder"):
        run_train(config(corpus, tmp_path / "missing", out, "steps=1"))
    small = tmp_path / "small_ctx"
    LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32).save_pretrained(small)
    with pytest.raises(ValueError, match="data.seq_len: 64 exceeds the model's context 32"):
        run_train(config(corpus, tokenizer_dir, out, "steps=1", f"model.config={small}"))
    assert not out.exists()


def test_cosine_schedule_lands_on_its_floor_at_the_last_step(corpus, tokenizer_dir, tmp_path):
    from miniplm.loop import lr_at

    for steps, warmup in ((100, 10), (12, 10), (11, 10), (1, 0)):
        cfg = config(corpus, tokenizer_dir, tmp_path, f"steps={steps}", f"optim.warmup_steps={warmup}")
        lrs = [lr_at(s, cfg) for s in range(steps)]
        assert lrs[-1] == pytest.approx(3e-3 * 0.1, rel=1e-12), (steps, warmup)
        assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # decays monotonically
        if steps > warmup + 1:
            assert max(lrs) == pytest.approx(3e-3)


def test_a_checkpoint_cannot_run_code_when_restored(tmp_path):
    import torch

    from miniplm.loop import load_state

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": {}, "state": {"step": 1}, "rng": torch.get_rng_state(), "x": Payload()},
               tmp_path / "state.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_state(str(tmp_path / "state.pt"))
    assert not marker.exists()
    plain = {"model": {"w": torch.ones(2)}, "state": {"step": 3, "tokens": 7}, "rng": torch.get_rng_state()}
    torch.save(plain, tmp_path / "ok.pt")
    assert load_state(str(tmp_path / "ok.pt"))["state"] == {"step": 3, "tokens": 7}
