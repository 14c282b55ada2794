"""train: loss goes down, DDP keeps replicas equal, resume continues the same curve,
the final checkpoint is a standard HF model the score stage reads, bad configs fail early."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import free_port, kill_tree, ray_worker_pids, read_metrics, train_overrides, write_jsonl
from transformers import AutoModelForCausalLM, LlamaConfig

from miniplm.config import load
from miniplm.data.prepare import PrepareConfig, run_prepare
from miniplm.scoring.score import ScoreConfig, run_score
from miniplm.training.train import TrainConfig, run_train


@pytest.fixture(scope="module")
def corpus(documents, tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("train_corpus")
    write_jsonl(root / "raw" / "a.jsonl", [{"text": d} for d in documents[0::2]])
    write_jsonl(root / "raw" / "b.jsonl", [{"text": d} for d in documents[1::2]])
    # many small parts: a killed token-cache build stops between parts (see that test)
    run_prepare(PrepareConfig(inputs=[str(root / "raw")], output=str(root / "inst"),
                              max_chars=1000, rows_per_part=5))
    return root / "inst"


SCHEDULE = ["optim.lr=3e-3", "optim.warmup_steps=5"]


def config_overrides(corpus, tokenizer_dir, output) -> list[str]:
    return train_overrides(corpus, tokenizer_dir, output) + SCHEDULE


def config(corpus, tokenizer_dir, output, *overrides) -> TrainConfig:
    return load(TrainConfig, None, config_overrides(corpus, tokenizer_dir, output) + list(overrides))


def run_settings(corpus) -> list[str]:
    """The run every training test shares: uninterrupted once (`clean_run`); killed while it
    builds its token cache and then at the first registered checkpoint (step 20), where it
    still has 140 steps (~4 s) to go, so the kill lands mid-run; its worker killed there once.
    160 steps also cross a pass over the corpus (1,034 sequences)."""
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
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert first > 5.5  # ~ln(vocab) at init
    assert last < first - 0.8, (first, last)  # ~6.2 at init
    assert rows[-1]["tokens"] == STEPS * 512 and rows[-1]["passes"] == 1
    assert all(r["mfu"] > 0 and r["tokens_per_s"] > 0 and r["lr"] > 0 for r in rows)
    # on CPU the denominator is a measured matmul rate, not a theoretical peak, and says so: a
    # step timed while that measurement ran slow can exceed 1, the typical step cannot
    assert rows[0]["mfu_peak_source"] == "measured matmul rate"
    assert sorted(r["mfu"] for r in rows)[len(rows) // 2] < 1
    assert rows[19]["eval_loss"] > rows[-1]["eval_loss"]
    assert rows[10]["lr"] > rows[-1]["lr"] == pytest.approx(3e-3 * 0.1)  # cosine to the floor

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.vocab_size == len(__import__("transformers").AutoTokenizer.from_pretrained(out / "final"))
    scores = run_score(ScoreConfig(instances=str(corpus), model=str(out / "final"),
                                   output=str(tmp_path / "scores"), cpus_per_worker=0.5))
    assert scores["rows"] > 0 and scores["mean_logprob_per_token"] > -rows[0]["loss"]
    # the checkpoint declares the context it was trained on, and scoring defaults to it
    assert model.config.trained_context == 64 and model.config.max_position_embeddings == 1024
    assert scores["provenance"]["max_length"] == 64
    # a longer max_length is warned about before any work (here then refused: the table there
    # was scored at 64)
    with pytest.warns(UserWarning, match="past .* declared context 64"), \
            pytest.raises(ValueError, match="max_length"):
        run_score(ScoreConfig(instances=str(corpus), model=str(out / "final"), max_length=128,
                              output=str(tmp_path / "scores"), cpus_per_worker=0.5))


def test_two_ddp_workers_stay_in_sync(second_run):
    """`second_run` trains on two DDP workers: at every checkpoint both replicas hold the very
    same weights, and every step counts both workers' tokens."""
    out, _ = second_run
    rows = read_metrics(out)
    synced = [r for r in rows if "replica_param_sums" in r]
    assert [r["step"] for r in synced] == [2, 4]  # every checkpoint (checkpoint_every=2)
    for row in synced:
        sums = row["replica_param_sums"]
        assert len(sums) == 2 and sums[0] == sums[1], row["step"]
    assert rows[-1]["tokens"] == 4 * 512


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


def last_registered_step(out) -> int:
    return max(int(step) for step in re.findall(r"step-(\d{8})", registered_checkpoints(out)))


def restores(rows: list[dict]) -> list[int]:
    """The checkpoint steps a run restored from, each marked on the first step it re-did."""
    restored = [r for r in rows if "resumed_from" in r]
    assert all(r["step"] == r["resumed_from"] + 1 for r in restored), restored
    return [r["resumed_from"] for r in restored]


# a learning rate so large that the first update overflows the tiny model's weights
DIVERGING = ["optim.lr=1e15", "optim.warmup_steps=1", "steps=8", "checkpoint_every=1", "keep_checkpoints=8"]


@pytest.mark.timeout(300)
def test_a_non_finite_loss_stops_every_rank_at_its_step_with_no_checkpoint_there(corpus, tokenizer_dir,
                                                                                 tmp_path):
    """After one update with that learning rate the loss is NaN. The DDP ranks stop at that step
    (none is left waiting in a collective: the run ends), before its update, with one line naming
    the step and the loss; no checkpoint or metrics line holds it, the earlier ones stay."""
    import ray.train

    out = tmp_path / "diverged"
    with pytest.raises(ray.train.TrainingFailedError) as failed:
        run_train(config(corpus, tokenizer_dir, out, *DIVERGING, "num_workers=2", "cpus_per_worker=0.5",
                         "micro_batch=4"))
    # the ranks Ray Train saw fail before it tore the group down (one or both): each with the message
    errors = {str(e) for e in failed.value.worker_failures.values()}
    assert 0 in failed.value.worker_failures and len(errors) == 1, errors
    (message,) = errors
    match = re.search(r"^train: the run diverged at step (\d+): loss (nan|-?inf), ", message)
    assert match and "\n" not in message, message
    from miniplm.cli import user_message

    assert user_message(failed.value) == message  # what the CLI prints: the one line, no traceback
    step = int(match[1])
    assert step >= 2  # it trained a step or more before: there are checkpoints to keep
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, step))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    saved = sorted({int(s) for s in re.findall(r"step-(\d{8})", registered_checkpoints(out))})
    assert saved == list(range(1, step)) and not list(out.glob(f"ray/**/step-{step:08d}"))
    assert not (out / "final").exists() and not (out / "_done.json").exists()


AGREE = """
import json, sys, torch, torch.distributed as dist
from miniplm.training.loop import mean_over_ranks
rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
nan, inf = float("nan"), float("inf")
# (total, LM, KL, gradient norm) of each rank: rank 1's batch overflowed; then rank 0's gradient
for mine in ([[6.0, 6.0, 0.0, 0.5], [nan, nan, 0.0, nan]], [[6.0, 6.0, 0.0, inf], [6.1, 6.1, 0.0, 0.5]]):
    print(json.dumps(mean_over_ranks(torch.tensor(mine[rank]), 2).tolist()))
"""


@pytest.mark.timeout(120)
def test_one_ranks_non_finite_loss_reaches_every_rank():
    """The stop is decided on values all DDP ranks share (real gloo, two processes): a NaN loss
    or an infinite gradient norm on one rank is seen by both, so both stop at the same step."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", AGREE, str(rank), port], stdout=subprocess.PIPE,
                              text=True) for rank in range(2)]
    outputs = [p.communicate(timeout=100)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outputs[0] == outputs[1], outputs
    loss_nan, norm_inf = (json.loads(line) for line in outputs[0].splitlines())
    assert math.isnan(loss_nan[0]) and math.isnan(loss_nan[3]) and loss_nan[2] == 0.0
    assert norm_inf[:3] == pytest.approx([6.05, 6.05, 0.0]) and math.isinf(norm_inf[3])


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


def test_model_config_reaches_workers_as_a_dict_and_builds_the_same_model(tokenizer_dir):
    """Ray Train's workers get the model config as a plain dict (so its controller need not
    import transformers); the dict must rebuild the very config, for every preset."""
    import torch

    from miniplm.models import PRESETS, ModelSpec, config_from_dict, load_tokenizer, model_config

    tok = load_tokenizer(str(tokenizer_dir))
    for preset in PRESETS:
        config = model_config(ModelSpec(preset=preset, tokenizer=str(tokenizer_dir)), tok, 64)
        rebuilt = config_from_dict(config.to_dict())
        assert type(rebuilt) is type(config) and rebuilt.to_dict() == config.to_dict(), preset
        assert rebuilt.trained_context == 64
    config = model_config(ModelSpec(preset="tiny", tokenizer=str(tokenizer_dir)), tok, 64)
    models = []
    for c in (config, config_from_dict(config.to_dict())):
        torch.manual_seed(0)
        models.append(AutoModelForCausalLM.from_config(c).state_dict())
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_cosine_schedule_lands_on_its_floor_at_the_last_step(corpus, tokenizer_dir, tmp_path):
    from miniplm.training.loop import lr_at

    for steps, warmup in ((100, 10), (12, 10), (11, 10), (1, 0)):
        cfg = config(corpus, tokenizer_dir, tmp_path, f"steps={steps}", f"optim.warmup_steps={warmup}")
        lrs = [lr_at(s, cfg) for s in range(steps)]
        assert lrs[-1] == pytest.approx(3e-3 * 0.1, rel=1e-12), (steps, warmup)
        assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # decays monotonically
        if steps > warmup + 1:
            assert max(lrs) == pytest.approx(3e-3)


def test_a_checkpoint_cannot_run_code_when_restored(tmp_path):
    import torch

    from miniplm.training.loop import load_state

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


def test_metrics_log_resumes_past_a_torn_last_line(tmp_path, capsys):
    """A run killed mid-append leaves half a line at the end of metrics.jsonl: the resumed run
    drops it (saying so once) and appends on a line of its own; a bad line before the end is
    no kill's doing and stops the run, naming file and line."""
    from miniplm.training.loop import MetricsLog

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 6.0 - s / 10} for s in range(1, 7)]
    whole = "".join(json.dumps(r) + "\n" for r in rows[:5])
    path.write_text(whole + '{"step": 6, "lo')
    log = MetricsLog(str(path), resume_step=4)
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 1 and str(path) in said[0] and "line 6" in said[0], said
    log.append(rows[4])
    assert read_metrics(tmp_path) == rows[:5]

    # torn just before its newline: the row is whole and kept, the next one gets its own line
    path.write_text(whole + json.dumps(rows[5]))
    MetricsLog(str(path), resume_step=6).append({"step": 7, "loss": 5.3})
    assert read_metrics(tmp_path) == rows + [{"step": 7, "loss": 5.3}]
    assert capsys.readouterr().out == ""

    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:8] + "\n"
    path.write_text("".join(lines))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: line 2 is not a JSON metrics row"):
        MetricsLog(str(path), resume_step=6)


def synthetic_cache(root, rows_per_part: list[int], seq_len: int = 4) -> dict:
    """A token cache whose sequence k holds the token k everywhere, so a batch says which
    sequences it came from."""
    import numpy as np
    import pyarrow as pa

    from miniplm import io

    parts, k = [], 0
    for i, rows in enumerate(rows_per_part):
        ids = np.repeat(np.arange(k, k + rows, dtype=np.int32), seq_len)
        io.write_parquet(str(root / f"part-{i:05d}.parquet"),
                         pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids), seq_len)}))
        parts.append({"name": f"part-{i:05d}.parquet", "rows": rows})
        k += rows
    return {"parts": parts, "sequences": k}


def sequences_of(batches) -> list[int]:
    return [int(row[0]) for b in batches for row in b]


def test_held_out_sample_spans_the_whole_set(tmp_path):
    """The in-training evaluation reads `eval.max_sequences` spread evenly over the held-out
    set, not its first rows (one document's, or one source's): the curve that the compute-saving
    factor is read from must measure the same text as the final held-out loss."""
    import numpy as np

    from miniplm.data.tokens import read_sequences

    manifest = synthetic_cache(tmp_path, [37, 41, 0, 29, 53])
    sample = read_sequences(str(tmp_path), manifest, 10)
    expected = np.linspace(0, manifest["sequences"] - 1, 10).round().astype(int)
    assert sample.shape == (10, 4) and sample[:, 0].tolist() == expected.tolist()
    assert read_sequences(str(tmp_path), manifest)[:, 0].tolist() == list(range(manifest["sequences"]))
    assert read_sequences(str(tmp_path), manifest, 10**6).shape == (manifest["sequences"], 4)


def test_sampler_passes_differ_ranks_split_and_resume_reads_only_its_window(tmp_path):
    import itertools

    from miniplm.data.sampler import CacheSampler

    manifest = synthetic_cache(tmp_path, [37, 41, 0, 29, 53, 31, 47, 43, 38, 26])
    kw = dict(seed=3, window=2, micro_batch=5)
    ranks = [CacheSampler(str(tmp_path), manifest, rank=r, world=2, **kw) for r in range(2)]
    for epoch in range(3):
        seen = [sequences_of(s.epoch_batches(epoch)) for s in ranks]
        n = ranks[0].batches_per_pass(epoch) * 5
        assert len(seen[0]) == len(seen[1]) == n  # DDP ranks take the same number of steps
        assert not set(seen[0]) & set(seen[1]) and len(set(seen[0] + seen[1])) == 2 * n  # no repeats
        assert 2 * n > manifest["sequences"] - 2 * (5 + 53)  # at most a micro-batch per rank + a part left out
    one = CacheSampler(str(tmp_path), manifest, rank=0, world=1, **kw)
    passes = [sequences_of(one.epoch_batches(e)) for e in range(2)]
    assert passes[0] != passes[1] and sorted(passes[0]) == sorted(passes[1])  # a new order per pass
    assert passes[0] == sequences_of(CacheSampler(str(tmp_path), manifest, rank=0, world=1, **kw)
                                     .epoch_batches(0))  # and the same one on a re-run

    # a resumed pass continues exactly, and reads at most the window it stops in and the next
    start = 47  # micro-batches already taken: row 235 of pass 1
    resumed = CacheSampler(str(tmp_path), manifest, rank=0, world=1, **kw)
    batches = resumed.epoch_batches(1, start=start)
    first = next(batches)
    largest_two_windows = 53 + 47 + 43 + 41
    assert resumed.rows_read <= largest_two_windows < start * 5
    assert sequences_of(itertools.chain([first], batches)) == passes[1][start * 5:]


@pytest.fixture(scope="module")
def second_run(corpus, tokenizer_dir, clean_run, tmp_path_factory):
    """Another run on the clean run's corpus with other settings (steps, seed, schedule, two DDP
    workers), into a copy of the finished clean run with overwrite=true, reading the clean run's
    token cache: (its output, the token cache's files and mtimes before it ran)."""
    out = tmp_path_factory.mktemp("second")
    shutil.copytree(clean_run, out, ignore=shutil.ignore_patterns("tokens"), dirs_exist_ok=True)
    cache = clean_run / "tokens"
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    run_train(config(corpus, tokenizer_dir, out, "steps=4", "checkpoint_every=2", "overwrite=true",
                     "optim.warmup_steps=1", "seed=7", f"eval.data={corpus}", f"token_cache={cache}",
                     "num_workers=2", "cpus_per_worker=0.5", "micro_batch=4"))
    return out, before


def test_changed_settings_never_resume_an_old_checkpoint(corpus, tokenizer_dir, clean_run, second_run):
    final = (clean_run / "final" / "model.safetensors").read_bytes()
    for change, key in (("steps=80", "steps"), ("data.seq_len=32", "data.seq_len"), ("seed=1", "seed"),
                        ("optim.lr=1e-3", "optim.lr"), ("data.fraction=0.5", "data.fraction")):
        with pytest.raises(ValueError, match=rf"holds a run made with other settings \(differs in: .*{key}"):
            run_train(config(corpus, tokenizer_dir, clean_run, *run_settings(corpus), change))
    assert (clean_run / "final" / "model.safetensors").read_bytes() == final  # untouched
    # settings that do not shape the run may change: the finished run is found complete, and
    # nothing is redone (no Ray Train job restores its last checkpoint only to save it again)
    files = [clean_run / "final" / "model.safetensors", clean_run / "metrics.jsonl", clean_run / "_done.json"]
    before = [f.stat().st_mtime_ns for f in files]
    summary = run_train(config(corpus, tokenizer_dir, clean_run, *run_settings(corpus), "log_every=5",
                               "eval.every=40", "keep_checkpoints=5"))
    assert summary["steps"] == STEPS and (clean_run / "final" / "model.safetensors").read_bytes() == final
    assert [f.stat().st_mtime_ns for f in files] == before

    # overwrite=true in a finished run's folder: a fresh run to the new schedule's own end
    out, _ = second_run
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "resumed_from" not in rows[0]
    assert rows[-1]["lr"] == pytest.approx(3e-3 * 0.1)
    assert (out / "final" / "model.safetensors").read_bytes() != final


def start_train_process(corpus, tokenizer_dir, out, settings) -> subprocess.Popen:
    """`miniplm train` in a process of its own with its own Ray, so a kill takes all of it."""
    args = [sys.executable, "-m", "miniplm.cli", "train"]
    for o in config_overrides(corpus, tokenizer_dir, out) + settings:
        args += ["--set", o]
    return subprocess.Popen(args, env=dict(os.environ, RAY_ADDRESS="local"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.timeout(900)
def test_a_run_killed_three_times_resumes_to_the_same_cache_and_curve(corpus, tokenizer_dir, clean_run,
                                                                      tmp_path):
    """`miniplm train` killed twice, its whole process tree each time (driver, the Ray it
    started, its workers): first while it packs the token cache, then at its first registered
    checkpoint. The re-run resumes there, and loses its training worker at the next checkpoint:
    Ray Train restores that one in place (`max_failures=1`) and the run finishes. Its cache
    equals the uninterrupted run's part for part, and its curve is the uninterrupted run's."""
    import pyarrow.parquet as pq

    from miniplm import io

    n_parts = len(io.read_json(str(corpus / io.MANIFEST))["parts"])
    out, cache = tmp_path / "killed", tmp_path / "cache"
    settings = [*run_settings(corpus), f"token_cache={cache}"]

    proc = start_train_process(corpus, tokenizer_dir, out, settings)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(list(cache.glob("*/part-*.parquet"))) >= 3:
            break
        time.sleep(0.02)
    kill_tree(proc.pid)
    proc.wait()
    (root,) = cache.iterdir()
    assert 3 <= len(list(root.glob("part-*.parquet"))) < n_parts and not (root / io.MANIFEST).exists()

    proc = start_train_process(corpus, tokenizer_dir, out, settings)  # finishes the cache, then trains
    wait_for_checkpoint(out, "step-00000020", alive=lambda: proc.poll() is None)
    kill_tree(proc.pid)
    proc.wait()
    assert not (out / "final").exists()
    resume_at = last_registered_step(out)  # 20, or later if the kill took longer than a checkpoint

    outcome: dict = {}

    def train():
        try:
            outcome["summary"] = run_train(config(corpus, tokenizer_dir, out, *settings, "max_failures=1"))
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=train)
    thread.start()
    wait_for_checkpoint(out, f"step-{resume_at + 20:08d}", alive=thread.is_alive)
    (pid,) = ray_worker_pids("RayTrainWorker")
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    assert (out / "final" / "config.json").exists()
    assert pid not in ray_worker_pids("RayTrainWorker")  # a new worker process took over

    (clean_root,) = (clean_run / "tokens").iterdir()
    assert clean_root.name == root.name  # the cache is keyed by its content alone
    assert io.read_json(str(root / io.MANIFEST)) == io.read_json(str(clean_root / io.MANIFEST))
    for part in clean_root.glob("part-*.parquet"):
        assert pq.read_table(part).equals(pq.read_table(root / part.name)), part.name
    resumed, clean = read_metrics(out), read_metrics(clean_run)
    first, second = restores(resumed)  # the re-run's, from the last registered checkpoint; the worker's
    assert first == resume_at >= 20 and second >= resume_at + 20
    assert_same_curve(resumed, clean)
    # up to the first restore, both trained from step 0 on the same cache: the very same losses
    assert [r["loss"] for r in resumed[:first]] == [r["loss"] for r in clean[:first]]


def test_students_on_one_corpus_share_one_token_cache(clean_run, second_run):
    out, before = second_run  # a run with another seed and budget, token_cache= the clean run's
    assert {p: p.stat().st_mtime_ns for p in (clean_run / "tokens").rglob("*")} == before
    assert not (out / "tokens").exists()


def test_training_sees_each_document_start_as_scoring_does(corpus, tokenizer_dir, gpt2_eos_only_dir,
                                                           clean_run, tmp_path):
    """The token before every document's first token in the token cache is the one the score
    stage puts before a text (BOS, or EOS for a tokenizer without one)."""
    import pyarrow.parquet as pq

    from miniplm.data.tokens import DataSpec, build_token_cache, read_sequences
    from miniplm.models import prefix_token_id
    from miniplm.models import load_tokenizer

    for tok_dir, cache_root in ((tokenizer_dir, clean_run / "tokens"), (gpt2_eos_only_dir, tmp_path)):
        tok = load_tokenizer(str(tok_dir))
        root, manifest = build_token_cache(DataSpec(path=str(corpus), seq_len=64), str(tok_dir), str(cache_root))
        checked = 0
        for part in manifest["parts"][:20]:  # a cache part packs the instances part of its name
            texts = pq.read_table(corpus / part["name"])["text"].to_pylist()
            stream = read_sequences(root, {"parts": [part]}).reshape(-1).tolist()
            pos = 1
            for text in texts[1:]:  # a part's first document has nothing before it
                ids = tok(text, add_special_tokens=False)["input_ids"]
                while pos + len(ids) <= len(stream) and stream[pos:pos + len(ids)] != ids:
                    pos += 1
                if pos + len(ids) > len(stream):
                    break
                assert stream[pos - 1] == prefix_token_id(tok), (tok_dir, part["name"], checked)
                pos, checked = pos + len(ids), checked + 1
        assert checked >= 40


def test_the_driver_bar_reads_only_what_the_metrics_log_gained(tmp_path):
    """The driver's train bar (miniplm.training.progress) looks at metrics.jsonl every second:
    it gets each appended row once, never a line still being written, and after a restore's
    rewrite (a new file) the whole log again."""
    from miniplm.training.loop import MetricsLog, append_line
    from miniplm.training.progress import MetricsTail

    url = str(tmp_path / "metrics.jsonl")
    tail = MetricsTail(url)
    assert tail.new_rows() == []  # no log yet
    log = MetricsLog(url, resume_step=0)
    for step in (1, 2):
        log.append({"step": step, "loss": 1.0 / step})
    assert [r["step"] for r in tail.new_rows()] == [1, 2]
    assert tail.new_rows() == []
    append_line(url, '{"step": 3, "loss": 0.3')  # torn: the rest of the line not yet written
    assert tail.new_rows() == []
    append_line(url, '}\n{"step": 4, "loss": 0.25}\n')
    assert [r["step"] for r in tail.new_rows()] == [3, 4]
    MetricsLog(url, resume_step=2).append({"step": 3, "loss": 0.31, "resumed_from": 2})  # a restore
    assert [(r["step"], r["loss"]) for r in tail.new_rows()] == [(1, 1.0), (2, 0.5), (3, 0.31)]
