"""A user's data is safe: outputs never replace a folder miniplm did not make, never overlap an
input, belong to one run at a time (a lease), and names from configs and manifests never lead
outside the output."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest
from conftest import SCORE_SETTINGS, save_tiny_model, score, write_jsonl

from miniplm import io
from miniplm.cli import main
from miniplm.scoring.score import ScoreConfig, run_score


def listing(root) -> dict[str, bytes]:
    """Every file under `root` with its bytes: what must stay exactly as it was."""
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


@pytest.fixture()
def users_folder(tmp_path):
    """A folder holding a user's own files, as `--output` by mistake."""
    mine = tmp_path / "mine"
    (mine / "keep").mkdir(parents=True)
    (mine / "keep" / "notes.txt").write_text("three years of notes\n")
    (mine / "part-00000-00000.parquet").write_bytes(b"not miniplm's")  # a name like ours, not ours
    return mine


def stage_argv(stage, out, instances, llama_dir, llama_scores, tokenizer_dir, corpus_dir) -> list[str]:
    table = str(llama_scores[1])
    return {
        "prepare": ["prepare", str(corpus_dir), "--output", str(out)],
        "score": ["score", "--instances", str(instances), "--model", str(llama_dir), "--output", str(out)],
        "select": ["select", "--instances", str(instances), "--teacher", table, "--reference", table,
                   "--output", str(out)],
        "train": ["train", "--set", f"output={out}", "--set", f"data.path={instances}", "--set",
                  f"model.tokenizer={tokenizer_dir}", "--set", "model.preset=tiny", "--set", "data.seq_len=64",
                  "--set", "steps=2"],
    }[stage]


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("stage", ["prepare", "score", "select", "train"])
def test_a_folder_miniplm_did_not_make_is_never_written_or_deleted(
        stage, overwrite, users_folder, instances, llama_dir, llama_scores, tokenizer_dir, corpus_dir, capsys):
    before = listing(users_folder)
    argv = stage_argv(stage, users_folder, instances, llama_dir, llama_scores, tokenizer_dir, corpus_dir)
    if overwrite:
        argv += ["--set", "overwrite=true"] if stage == "train" else ["--overwrite"]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert f"{users_folder} is not empty and miniplm {stage} did not make it" in err
    assert "keep" in err and "give another output folder" in err
    assert "--overwrite" not in err  # never suggests replacing it
    assert listing(users_folder) == before  # not a byte added, changed or removed


def test_overwrite_replaces_only_the_same_stages_output(instances, llama_scores, tmp_path, capsys):
    """A score table given as `prepare --output --overwrite` is another stage's: kept."""
    copy = tmp_path / "scores"
    shutil.copytree(llama_scores[1], copy)
    before = listing(copy)
    assert main(["prepare", str(instances), "--output", str(copy), "--overwrite"]) != 0
    assert "holds the output of `miniplm score`, not of `prepare`" in capsys.readouterr().err
    assert listing(copy) == before


@pytest.mark.parametrize("case", ["is", "inside", "contains"])
def test_an_output_that_overlaps_an_input_is_refused(case, corpus_dir, instances, llama_scores, tmp_path, capsys):
    raw = tmp_path / "raw"
    shutil.copytree(corpus_dir, raw)
    table = str(llama_scores[1])
    if case == "is":  # prepare data --output data --overwrite
        argv, watched = ["prepare", str(raw), "--output", str(raw), "--overwrite"], raw
    elif case == "inside":  # its files would be read as corpus by the next run
        argv, watched = ["prepare", str(raw), "--output", str(raw / "instances")], raw
    else:  # select --instances W --output <a folder holding W>
        inst = tmp_path / "work" / "inst"
        shutil.copytree(instances, inst)
        argv, watched = ["select", "--instances", str(inst), "--teacher", table, "--reference", table,
                         "--output", str(tmp_path / "work"), "--overwrite"], tmp_path / "work"
    before = listing(watched)
    assert main(argv) != 0
    relation = {"is": "is", "inside": "is inside", "contains": "contains"}[case]
    assert f"{relation} the input" in capsys.readouterr().err
    assert listing(watched) == before


def test_select_output_equal_to_its_instances_is_refused(instances, llama_scores, tmp_path, capsys):
    inst = tmp_path / "inst"
    shutil.copytree(instances, inst)
    before = listing(inst)
    table = str(llama_scores[1])
    assert main(["select", "--instances", str(inst), "--teacher", table, "--reference", table,
                 "--output", str(inst), "--overwrite"]) != 0
    assert f"output {inst} is the input {inst}" in capsys.readouterr().err
    assert listing(inst) == before


def read_table(root):
    manifest = io.read_json(str(root / io.MANIFEST))
    return pq.read_table([str(root / p["name"]) for p in manifest["parts"]]).sort_by("id")


@pytest.mark.timeout(300)
def test_a_second_run_on_a_held_output_refuses_naming_the_holder(
        instances, llama_dir, gpt2_eos_only_dir, llama_scores, tmp_path, capsys):
    out = tmp_path / "scores"
    first_wrote_a_part, second_tried = threading.Event(), threading.Event()
    failure = []

    def pause_after_first_part(name):
        first_wrote_a_part.set()
        second_tried.wait(timeout=120)

    def first_run():
        try:
            run_score(ScoreConfig(instances=str(instances), model=str(llama_dir), output=str(out),
                                  **SCORE_SETTINGS), on_part_written=pause_after_first_part)
        except BaseException as err:  # noqa: BLE001 (reported by the assertion below)
            failure.append(err)
            first_wrote_a_part.set()

    thread = threading.Thread(target=first_run)
    thread.start()
    try:
        assert first_wrote_a_part.wait(timeout=180) and not failure, failure
        # the second run, with another model and --overwrite, as a user in another terminal
        rc = main(["score", "--instances", str(instances), "--model", str(gpt2_eos_only_dir),
                   "--output", str(out), "--overwrite", "--cpus-per-worker", "0.5"])
    finally:
        second_tried.set()
        thread.join(timeout=240)
    assert rc != 0 and not failure, failure
    err = capsys.readouterr().err
    assert f"{out} is in use by another run: miniplm score, pid {os.getpid()} on {socket.gethostname()}" in err
    # the table left is the first run's, whole: every part its model's, equal to a clean run
    manifest = io.read_json(str(out / io.MANIFEST))
    for part in manifest["parts"]:
        assert io.read_parquet_metadata(str(out / part["name"]))["model_fingerprint"] == \
            llama_scores[0]["provenance"]["model_fingerprint"]
    assert read_table(out).equals(read_table(llama_scores[1]))
    assert not (out / "_lease.json").exists()  # released when the run ended


HOLD_LEASE = """
import sys, time
from miniplm.lease import Lease
with Lease(sys.argv[1], "score"):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.mark.timeout(300)
def test_the_lease_of_a_killed_run_is_taken_over(instances, llama_dir, llama_scores, tmp_path, capsys):
    from miniplm.lease import OutputBusy

    out = tmp_path / "scores"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LEASE, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputBusy, match=rf"pid {holder.pid} on {socket.gethostname()}"):
            score(instances, llama_dir, out)
    finally:
        holder.send_signal(signal.SIGKILL)  # the run dies as a machine failure kills it: no clean-up
        holder.wait()
    assert json.loads((out / "_lease.json").read_text())["pid"] == holder.pid
    capsys.readouterr()
    score(instances, llama_dir, out)
    said = capsys.readouterr().out
    assert f"lease: {out} was held by a run that is gone (miniplm score, pid {holder.pid}" in said
    assert "taking it over" in said
    assert read_table(out).equals(read_table(llama_scores[1]))


def test_lease_on_object_storage_is_exclusive(s3_server):
    import s3fs

    from miniplm.lease import Lease, OutputBusy

    fs = s3fs.S3FileSystem(endpoint_url=s3_server["AWS_ENDPOINT_URL"], key="testing", secret="testing")
    fs.mkdir("leases")
    env = {k: os.environ.get(k) for k in s3_server}
    os.environ.update(s3_server)
    try:
        with Lease("s3://leases/run", "score"):
            assert json.loads(fs.cat("leases/run/_lease.json"))["pid"] == os.getpid()
            with pytest.raises(OutputBusy, match="s3://leases/run is in use by another run: miniplm score"):
                with Lease("s3://leases/run", "select"):
                    pass
        assert not fs.exists("leases/run/_lease.json")
        with Lease("s3://leases/run", "select"):  # free again
            pass
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


@pytest.mark.parametrize("name", ["../../x", "a/b", ".."])
def test_names_from_a_config_cannot_leave_the_run_folder(name, tmp_path):
    from miniplm.pipeline.run import DEMO_CONFIG, load_pipeline

    run = f"output={tmp_path / 'run'}"
    with pytest.raises(ValueError, match=r"students\[0\]\.name: .* is not a plain name"):
        load_pipeline(DEMO_CONFIG, [run, f"students[0].name={name}"])
    with pytest.raises(ValueError, match=r"report: .* is not a plain name"):
        load_pipeline(DEMO_CONFIG, [run, f"report={name}"])


def test_part_names_from_a_manifest_cannot_leave_the_output(instances, llama_dir, tmp_path):
    inst = tmp_path / "work" / "inst"
    shutil.copytree(instances, inst)
    manifest = io.read_json(str(inst / io.MANIFEST))
    first = manifest["parts"][0]["name"]
    (tmp_path / "work" / first).write_bytes((inst / first).read_bytes())  # what `../name` would reach
    manifest["parts"][0]["name"] = f"../{first}"
    io.write_json(str(inst / io.MANIFEST), manifest)
    with pytest.raises(ValueError, match=rf"part: '\.\./{first}' is not a plain name"):
        score(inst, llama_dir, tmp_path / "work" / "scores")
    assert not any(p.name.startswith("part-") for p in (tmp_path / "work").iterdir() if p.is_file()
                   and p.name != first)


def test_score_refuses_a_tokenizer_whose_ids_overflow_the_model(tokenizer_dir, documents, instances, tmp_path):
    """A model saved with a smaller tokenizer than the one beside it: an IndexError on CPU and
    a device-side assert on CUDA once scoring starts, unless refused first."""
    small = tmp_path / "small_tok"
    from conftest import train_tokenizer

    train_tokenizer(documents, small, vocab_size=300)
    model = save_tiny_model("llama", small, tmp_path / "model")
    shutil.copy(tokenizer_dir / "tokenizer.json", model / "tokenizer.json")  # the wrong tokenizer beside it
    with pytest.raises(ValueError, match=r"--model: the model's vocabulary \(\d+\) is smaller than its "
                                         r"tokenizer's \d+ ids"):
        score(instances, model, tmp_path / "scores")
    assert not (tmp_path / "scores").exists()


def test_select_refuses_a_table_whose_parts_two_models_wrote(instances, llama_scores, gpt2_eos_only_dir,
                                                              tmp_path, capsys):
    mixed = tmp_path / "mixed"
    shutil.copytree(llama_scores[1], mixed)
    other = tmp_path / "gpt2"
    score(instances, gpt2_eos_only_dir, other)
    name = io.read_json(str(mixed / io.MANIFEST))["parts"][1]["name"]
    shutil.copy(other / name, mixed / name)  # one part of another model's, same ids and row count
    assert main(["select", "--instances", str(instances), "--teacher", str(mixed), "--reference",
                 str(llama_scores[1]), "--output", str(tmp_path / "refined")]) != 0
    err = capsys.readouterr().err
    assert f"teacher table {mixed}: part {name} was scored with other settings" in err
    assert "model_fingerprint" in err and not (tmp_path / "refined" / io.MANIFEST).exists()


def test_prepare_notices_an_input_changed_since(tmp_path, documents, ray_session, capsys):
    from miniplm.data.prepare import PrepareConfig, run_prepare

    raw = write_jsonl(tmp_path / "raw" / "docs.jsonl", [{"text": d} for d in documents[:5]])
    cfg = PrepareConfig(inputs=[str(raw)], output=str(tmp_path / "inst"))
    assert run_prepare(cfg)["instances"] == 5
    with open(raw, "a") as f:
        f.write(json.dumps({"text": documents[5]}) + "\n")
    capsys.readouterr()
    with pytest.raises(ValueError, match=r"made with different settings \(versions differ\)"):
        run_prepare(cfg)
    assert "already complete" not in capsys.readouterr().out


# ---------------------------------------------------------------- messages, not tracebacks


def test_a_missing_config_file_is_one_line_naming_it(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SystemExit) as exited:
        main(["train", "--config", str(missing)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"{missing}: no such config file" in err and "Traceback" not in err
    (tmp_path / "bad.yaml").write_text("data:\n  path: [unclosed\n")
    with pytest.raises(SystemExit):
        main(["train", "--config", str(tmp_path / "bad.yaml")])
    assert f"{tmp_path / 'bad.yaml'}, line 3: not valid YAML" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a folder given for the file
        main(["train", "--config", str(tmp_path)])
    assert f"{tmp_path}: cannot read the config file" in capsys.readouterr().err


def test_an_unknown_report_baseline_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    runs = []
    for name in ("vanilla", "miniplm"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(
            json.dumps({"step": 1, "loss": 5.0, "eval_loss": 5.0, "flops": 1e9, "tokens": 100}) + "\n")
        runs.append(str(tmp_path / name))
    argv = ["report", *runs, "--baseline", "vanila", "--output", str(tmp_path / "report")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--baseline vanila: not one of the runs given (vanilla, miniplm)" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="--baseline vanila"):
        main(["--debug", *argv])


def test_an_lm_eval_task_yaml_with_function_tags_names_its_task(tmp_path):
    from miniplm.evaluation.evaluate import task_name

    spec = tmp_path / "arc_local.yaml"
    spec.write_text("task: arc_local\ndataset_path: json\nprocess_docs: !function utils.process_docs\n"
                    "doc_to_text: !function utils.doc_to_text\n")
    assert task_name(str(spec)) == "arc_local"
    (tmp_path / "nameless.yaml").write_text("dataset_path: json\n")
    with pytest.raises(ValueError, match="nameless.yaml: an lm-eval task YAML needs a `task:` name"):
        task_name(str(tmp_path / "nameless.yaml"))


def test_a_held_output_exits_2_naming_the_holder(instances, llama_dir, tmp_path, capsys):
    from miniplm.lease import Lease

    out = tmp_path / "scores"
    with Lease(str(out), "score"):
        assert main(["score", "--instances", str(instances), "--model", str(llama_dir), "--output", str(out)]) == 2
    assert f"{out} is in use by another run: miniplm score, pid {os.getpid()}" in capsys.readouterr().err


# ---------------------------------------------------------------- reuse keyed on what made it


def test_a_tokenizer_is_reused_only_for_the_same_settings(instances, tmp_path, capsys):
    from transformers import AutoTokenizer

    from miniplm.data.tokenizer import TokenizerConfig, run_train_tokenizer

    out = tmp_path / "tok"
    run_train_tokenizer(TokenizerConfig(instances=str(instances), output=str(out), vocab_size=300))
    assert len(AutoTokenizer.from_pretrained(out)) == 300
    capsys.readouterr()
    run_train_tokenizer(TokenizerConfig(instances=str(instances), output=str(out), vocab_size=300))
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"made with different settings \(vocab_size differ\)"):
        run_train_tokenizer(TokenizerConfig(instances=str(instances), output=str(out), vocab_size=320))
    run_train_tokenizer(TokenizerConfig(instances=str(instances), output=str(out), vocab_size=320, overwrite=True))
    assert len(AutoTokenizer.from_pretrained(out)) == 320 and not (out / io.TMP).exists()


def test_a_sample_corpus_of_another_size_is_not_reused(tmp_path):
    from miniplm.demo.sample_corpus import write_sample_corpus
    from miniplm.pipeline.run import DEMO_CONFIG, Steps, load_pipeline, prepare_data

    run = tmp_path / "run"
    write_sample_corpus(str(run / "sample"), max_bytes=100_000)
    cfg = load_pipeline(DEMO_CONFIG, [f"output={run}", "corpus.sample_bytes=150000"])
    with pytest.raises(ValueError, match="corpus.sample_bytes: .* holds a sample corpus of max_bytes 100000, not 150000"):
        prepare_data(cfg, Steps())
    assert sorted(p.name for p in run.iterdir()) == ["sample"]  # nothing else was made


def test_a_final_checkpoint_appears_whole_or_not_at_all(llama_dir, tokenizer_dir, tmp_path, monkeypatch):
    """The disk fills up after the weights are written and before the tokenizer: no `final/`
    is left that a user or the pipeline's eval could take for a checkpoint."""
    import types

    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from miniplm.training.loop import save_final

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    cfg = types.SimpleNamespace(output=str(tmp_path / "run"), model=types.SimpleNamespace(tokenizer=str(tokenizer_dir)))
    (tmp_path / "run").mkdir()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(PreTrainedTokenizerFast, "save_pretrained", disk_full)
        with pytest.raises(io.StorageError, match="final: No space left on device"):
            save_final(model, cfg)
    assert not (tmp_path / "run" / "final").exists()
    save_final(model, cfg)  # the re-run
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["final"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").num_parameters() == model.num_parameters()


# ---------------------------------------------------------------- never hang silently


@pytest.mark.parametrize("left_by", ["ray_address", "ray_start"])
def test_a_dead_cluster_address_is_reported_in_seconds(left_by, corpus_dir, tmp_path):
    """A cluster stopped uncleanly leaves its address behind; `ray.init` would retry it for
    minutes without a word."""
    from conftest import free_port

    port = free_port()
    dead = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if left_by == "ray_address":
        env["RAY_ADDRESS"] = dead
    else:  # the address file `ray start` writes, in a Ray temp dir of this test's own
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(dead)
        env["RAY_TMPDIR"] = str(tmp_path)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "miniplm.cli", "prepare", str(corpus_dir), "--output",
                           str(tmp_path / "inst")], env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert done.returncode == 1 and took < 60, (took, done.stderr[-2000:])
    assert re.search(rf"the Ray cluster at [\d.]+:{port} \(.*\) does not answer", done.stderr), done.stderr[-2000:]
    where = "given by --address / RAY_ADDRESS" if left_by == "ray_address" else "found in the address file"
    assert where in done.stderr
    assert "ray stop" in done.stderr and "--address local" in done.stderr


def test_a_scoring_pool_that_leaves_no_cpu_for_reading_is_refused(instances, llama_dir, tmp_path, capsys):
    """Four actors of half a CPU hold this 2-CPU cluster whole: the tasks that read and tokenise
    the parts would never start, and the run would wait forever without a word."""
    assert main(["score", "--instances", str(instances), "--model", str(llama_dir), "--output",
                 str(tmp_path / "s"), "--workers", "4", "--cpus-per-worker", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "4 scoring worker(s) x 0.5 CPUs leave less than 0.5 of the cluster's 2 CPUs" in err
    assert not list((tmp_path / "s").glob("part-*"))
