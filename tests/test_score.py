"""score: log-probabilities equal the model's own loss, every instance once, resume, refusals."""

from __future__ import annotations

import os
import shutil
import signal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SCORE_SETTINGS, ray_worker_pids, save_tiny_model, score, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from miniplm import io
from miniplm.data.prepare import PrepareConfig, run_prepare
from miniplm.scoring.logprob import pack_by_tokens, windows
from miniplm.scoring.score import PartKillsWorker, ScoreConfig, run_score


def read_table(root) -> pa.Table:
    manifest = io.read_json(io.join(str(root), io.MANIFEST))
    return pa.concat_tables(pq.read_table(root / p["name"]) for p in manifest["parts"])


def reference_logprob(model, tok, text: str, max_length: int, stride: int) -> tuple[float, int]:
    """Independent check: the model's own mean loss (HF `labels=`) times the token count,
    window by window as in the transformers perplexity guide."""
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = tok(text, add_special_tokens=False)["input_ids"]
    seq = torch.tensor([prefix] + ids)
    total, scored_until, end = 0.0, 1, min(max_length, len(seq))
    while True:
        begin = end - max_length if end > max_length else 0
        window = seq[begin:end][None]
        labels = window.clone()
        labels[0, : scored_until - begin] = -100  # context only: already scored
        n = int((labels[0, 1:] != -100).sum())
        with torch.no_grad():
            total -= model(input_ids=window, labels=labels).loss.item() * n
        if end == len(seq):
            return total, len(ids)
        scored_until, end = end, min(end + stride, len(seq))


# One score table per model, shared by the tests that only read it (or copy it): a run is
# ~15 s of Ray and model start-up on 2 CPUs. Each fixture gives (manifest, folder); the
# Llama's (`llama_scores`) is the session's.
@pytest.fixture(scope="module")
def gpt2_scores(instances, gpt2_eos_only_dir, llama_scores, tmp_path_factory):
    """Scored with overwrite=true into a copy of the Llama's finished table, as a user re-scores
    an output with another model: test_scores_equal_model_loss checks that every row is then
    the GPT-2's own, test_refuses_output_of_another_model that nothing of the Llama's is left."""
    out = tmp_path_factory.mktemp("gpt2_scores") / "s"
    shutil.copytree(llama_scores[1], out)
    return score(instances, gpt2_eos_only_dir, out, overwrite=True), out


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_scores_equal_model_loss(model, instances, request):
    from transformers import AutoConfig

    model_dir = request.getfixturevalue({"llama": "llama_dir", "gpt2": "gpt2_eos_only_dir"}[model])
    manifest, scores = request.getfixturevalue(f"{model}_scores")
    table = read_table(scores)
    # every instance exactly once, nothing else, each its model's own loss
    assert table.num_rows == io.read_json(str(instances / io.MANIFEST))["instances"] == manifest["rows"]
    assert table.schema.field("logprob").type == pa.float64()
    assert manifest["provenance"]["max_length"] == AutoConfig.from_pretrained(model_dir).max_position_embeddings
    long_texts = assert_scores_equal_model_loss(table, instances, model_dir)
    assert long_texts >= 5  # the sliding window was exercised
    assert manifest["tokens"] == sum(table["n_tokens"].to_pylist())


def test_provenance_in_parquet_and_manifest(instances, llama_dir, llama_scores):
    manifest, scores = llama_scores
    inst_manifest = io.read_json(str(instances / io.MANIFEST))
    prov = io.read_parquet_metadata(str(scores / manifest["parts"][0]["name"]))
    assert prov == manifest["provenance"]
    assert prov["instances_fingerprint"] == inst_manifest["fingerprint"]
    assert prov["model"] == str(llama_dir) and prov["dtype"] == "float32"
    for key in ("model_fingerprint", "tokenizer_fingerprint", "max_length", "version"):
        assert prov[key]
    assert [p["name"] for p in manifest["parts"]] == [p["name"] for p in inst_manifest["parts"]]


def test_killed_run_resumes_to_identical_table(instances, llama_dir, llama_scores, tmp_path, capsys):
    clean, clean_dir = llama_scores

    class Killed(Exception):
        pass

    def die_after_two(name, written=[]):
        written.append(name)
        if len(written) == 2:
            raise Killed(name)

    cfg = ScoreConfig(instances=str(instances), model=str(llama_dir), output=str(tmp_path / "run"),
                      **SCORE_SETTINGS)
    with pytest.raises(Killed):
        run_score(cfg, on_part_written=die_after_two)
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("part-*.parquet")}
    assert len(first) == 2 and not (tmp_path / "run" / io.MANIFEST).exists()

    rescored = []
    resumed = run_score(cfg, on_part_written=rescored.append)
    assert set(rescored) == {p["name"] for p in clean["parts"]} - set(first)  # only missing work
    assert all((tmp_path / "run" / n).stat().st_mtime_ns == t for n, t in first.items())
    assert read_table(tmp_path / "run").equals(read_table(clean_dir))
    assert resumed["rows"] == clean["rows"]

    capsys.readouterr()
    again = []
    run_score(cfg, on_part_written=again.append)
    assert again == [] and "nothing to do" in capsys.readouterr().out


def test_refuses_output_of_another_model(instances, gpt2_eos_only_dir, llama_scores, gpt2_scores, tmp_path):
    shutil.copytree(llama_scores[1], tmp_path / "s")  # a finished llama table
    before = read_table(tmp_path / "s")
    with pytest.raises(ValueError, match="model_fingerprint.*differ.*--overwrite"):
        score(instances, gpt2_eos_only_dir, tmp_path / "s")
    assert read_table(tmp_path / "s").equals(before)  # refused before any work
    # with --overwrite (`gpt2_scores`, made in such a copy): the GPT-2's table, part for part
    manifest, folder = gpt2_scores
    assert manifest["provenance"]["model"] == str(gpt2_eos_only_dir)
    assert sorted(p.name for p in folder.glob("part-*.parquet")) == sorted(p["name"] for p in manifest["parts"])
    for part in manifest["parts"]:
        assert io.read_parquet_metadata(str(folder / part["name"])) == manifest["provenance"], part["name"]
    assert not read_table(folder).equals(before)


def load_scorer_inputs(model_dir, documents, n=40):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = documents[:n]
    seqs = [np.array(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return model, tok, texts, seqs


@pytest.mark.parametrize("model_fixture", ["llama_dir", "gpt2_eos_only_dir", "qwen2_dir"])
def test_packed_rows_equal_padded_rows_and_model_loss(model_fixture, documents, request):
    """Packed rows (windows side by side, positions restarting per window, no mask) score
    exactly what padded rows and the model's own `labels=` loss score: attention never
    crosses from one window into the next, and absolute position embeddings (GPT-2) restart."""
    from miniplm.scoring.logprob import SequenceScorer

    model, tok, texts, seqs = load_scorer_inputs(request.getfixturevalue(model_fixture), documents, n=12)
    L = model.config.max_position_embeddings
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    scores = {}
    for packing in ("padded", "packed"):
        scorer = SequenceScorer(model, max_length=L, stride=L // 2, batch_tokens=8 * L,
                                prefix_id=prefix, packing=packing)
        assert scorer.chunked_head and scorer.packing == packing
        scores[packing] = scorer.score(seqs)
    expected = [reference_logprob(model, tok, t, L, L // 2)[0] for t in texts]
    assert sum(len(s) + 1 > L for s in seqs) >= 5  # windows were exercised
    np.testing.assert_allclose(scores["packed"], scores["padded"], rtol=1e-5)
    np.testing.assert_allclose(scores["packed"], expected, rtol=1e-5)
    np.testing.assert_allclose(scores["padded"], expected, rtol=1e-5)


def test_head_chunks_vocabulary_blocks_and_model_logits_agree(llama_dir, documents):
    """The memory-bounded LM head (scored positions only, vocabulary in blocks) and the
    fallback through the model's own logits (a few rows at a time) change no number."""
    from miniplm.scoring.logprob import SequenceScorer

    model, tok, _, seqs = load_scorer_inputs(llama_dir, documents, n=12)
    vocab = model.config.vocab_size

    def scores(**kw):
        return SequenceScorer(model, max_length=64, stride=16, batch_tokens=256,
                              prefix_id=tok.bos_token_id, **kw)

    whole = scores()
    assert whole.chunked_head
    reference = whole.score(seqs)
    # 7 positions per chunk, 7 x 4 bytes x 37 columns per block: the vocabulary in 14 blocks
    blocks = scores(head_chunk_tokens=7, head_chunk_bytes=7 * 4 * 37)
    assert vocab > 37 * 13
    np.testing.assert_allclose(blocks.score(seqs), reference, rtol=1e-6)
    fallback = scores(head_chunk_bytes=64 * vocab * 4 * 2)  # two 64-token rows of logits per pass
    fallback.chunked_head = False
    np.testing.assert_allclose(fallback.score(seqs), reference, rtol=1e-6)


def test_model_that_post_processes_logits_is_scored_by_its_own_logits(tokenizer_dir, documents,
                                                                       tmp_path):
    """Gemma 2 soft-caps its logits after the LM head: the scorer notices, scores through
    the model's logits (packed falls back to rows), and still equals the model's own loss."""
    from transformers import Gemma2Config

    from miniplm.scoring.logprob import SequenceScorer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          max_position_embeddings=64, final_logit_softcapping=3.0,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    texts = documents[:8]
    seqs = [np.array(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    with pytest.warns(UserWarning, match="post-processes its logits"):
        scorer = SequenceScorer(model, max_length=64, stride=32, batch_tokens=256,
                                prefix_id=tok.bos_token_id, packing="packed")
    assert not scorer.chunked_head
    expected = [reference_logprob(model, tok, t, 64, 32)[0] for t in texts]
    np.testing.assert_allclose(scorer.score(seqs), expected, rtol=1e-5)


def test_windows_score_each_token_once():
    for n, L, stride in [(1, 8, 4), (5, 8, 4), (8, 8, 4), (9, 8, 4), (100, 8, 3), (37, 16, 15)]:
        wins = windows(n, L, stride)
        targets = [t for w in wins for t in range(w.first_target, w.end)]
        assert targets == list(range(1, n))
        assert all(w.end - w.start <= L and w.first_target > w.start for w in wins if w.end > 1)
        assert all(w.first_target - w.start >= L - stride for w in wins[1:])  # enough context


def test_pack_by_tokens_respects_budget():
    lengths = [5, 64, 3, 33, 64, 10, 1, 200]
    batches = pack_by_tokens(lengths, 128)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 128


def test_score_actor_runs_all_its_torch_work_on_one_thread(instances, llama_dir, tmp_path):
    """Ray Data builds a map actor on one thread and calls it from another. Torch on both gives
    OpenMP two thread teams in one process, and then its workers sleep at every barrier instead
    of spinning: on 2 cores the actor scored ~10% slower than the same scorer in a plain actor."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from miniplm.data.encode import text_encoder, tokenize_part
    from miniplm.scoring.score import ScoreActor

    part = io.read_json(str(instances / io.MANIFEST))["parts"][0]
    row = tokenize_part({"part": [part["name"]], "url": [io.join(str(instances), part["name"])]},
                        encoder=text_encoder(str(llama_dir)))
    threads = set()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda *_: threads.add(threading.get_ident()))
    try:
        actor = ScoreActor(str(llama_dir), device="cpu", dtype="float32", max_length=64, stride=32,
                           batch_tokens=512, packing="auto", trust_remote_code=False, num_threads=1,
                           instances=str(instances), output=str(tmp_path / "scores"), max_tries=3, workers=1)
        with ThreadPoolExecutor(max_workers=1) as ray_data_caller:
            scored = ray_data_caller.submit(actor, row).result()
    finally:
        hook.remove()
    assert scored.num_rows == part["rows"]
    assert len(threads) == 1 and threading.get_ident() not in threads


def test_bad_arguments_fail_before_work(instances, tmp_path):
    with pytest.raises(ValueError, match="device"):
        ScoreConfig(instances="i", model="m", output="o", device="tpu")
    for field, value in [("gpus_per_worker", 0), ("gpus_per_worker", 1.5), ("packing", "ragged"),
                         ("max_tries", 0)]:
        with pytest.raises(ValueError, match=field):
            ScoreConfig(instances="i", model="m", output="o", **{field: value})
    with pytest.raises(FileNotFoundError, match="config.json"):
        run_score(ScoreConfig(instances=str(instances), model=str(tmp_path), output=str(tmp_path / "o")))
    with pytest.raises(FileNotFoundError, match="_manifest.json"):
        run_score(ScoreConfig(instances=str(tmp_path), model=str(tmp_path), output=str(tmp_path / "o")))


def assert_scores_equal_model_loss(table: pa.Table, instances, model_dir, **load) -> int:
    """Every instance once, each log-probability its model's own loss (`reference_logprob`,
    at the model's context, stride half of it); returns how many needed more than one window."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, **load).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    L = model.config.max_position_embeddings
    inst = pa.concat_tables(pq.read_table(instances / p["name"])
                            for p in io.read_json(str(instances / io.MANIFEST))["parts"])
    texts = dict(zip(inst["id"].to_pylist(), inst["text"].to_pylist()))
    assert sorted(table["id"].to_pylist()) == sorted(texts)
    long_texts = 0
    for row in table.to_pylist():
        expected, n = reference_logprob(model, tok, texts[row["id"]], L, L // 2)
        long_texts += n + 1 > L
        assert row["n_tokens"] == n and row["logprob"] == pytest.approx(expected, rel=1e-5), row["id"]
    return long_texts


@pytest.mark.timeout(600)
def test_killed_scoring_actor_is_replaced_and_the_table_is_complete(instances, tokenizer_dir, tmp_path):
    # a model slow enough on CPU that parts are still being scored when the actor dies
    model_dir = save_tiny_model("llama", tokenizer_dir, tmp_path / "model", hidden=256, layers=6)
    killed, seen_after = [], set()

    def kill_the_actor_once(name):
        pids = ray_worker_pids("ScoreActor")
        if not killed:
            assert len(pids) == 1, pids
            killed.append(pids.pop())
            os.kill(killed[0], signal.SIGKILL)  # 1 of 4 parts written: the others are in flight
        else:
            seen_after.update(pids)

    cfg = ScoreConfig(instances=str(instances), model=str(model_dir), output=str(tmp_path / "run"),
                      **SCORE_SETTINGS)
    run_score(cfg, on_part_written=kill_the_actor_once)
    assert killed and seen_after and killed[0] not in seen_after  # a new process took over
    assert_scores_equal_model_loss(read_table(tmp_path / "run"), instances, model_dir)


KILLER_CODE = """
import os

from transformers import LlamaForCausalLM


class KillerLlamaForCausalLM(LlamaForCausalLM):
    \"\"\"Ends its own process when it reads token `config.kill_token_id` while the file
    `config.kill_switch` exists: a document that takes its worker down, as an OOM kill would.\"\"\"

    def __init__(self, config):
        deaths = getattr(config, "deaths_on_load", None)  # a folder: each file in it is one death
        if deaths and os.listdir(deaths):
            os.remove(os.path.join(deaths, sorted(os.listdir(deaths))[0]))
            os._exit(1)  # the worker dies while loading the model, as an OOM kill would
        super().__init__(config)
        self.model.embed_tokens.register_forward_pre_hook(self._die_on_marker)

    def _die_on_marker(self, module, args):
        if os.path.exists(self.config.kill_switch) and bool((args[0] == self.config.kill_token_id).any()):
            os._exit(1)
"""


def save_killer_model(tokenizer_dir, out, kill_switch, deaths_on_load=None):
    """A tiny Llama shipped with its own modeling code (loaded with trust_remote_code) whose
    process dies on the special token `<kill>` while `kill_switch` exists, and while loading
    as long as the folder `deaths_on_load` holds a file (one file used up per death)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<kill>"]})
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    config.kill_token_id = tok.convert_tokens_to_ids("<kill>")
    config.kill_switch = str(kill_switch)
    config.deaths_on_load = str(deaths_on_load) if deaths_on_load else None
    config.auto_map = {"AutoModelForCausalLM": "modeling_killer.KillerLlamaForCausalLM"}
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "modeling_killer.py").write_text(KILLER_CODE)
    return out


@pytest.mark.timeout(400)
def test_part_that_kills_its_worker_every_time_fails_naming_it_and_resumes_once_fixed(
        documents, tokenizer_dir, tmp_path, ray_session):
    switch = tmp_path / "kill_switch"
    model_dir = save_killer_model(tokenizer_dir, tmp_path / "model", switch)
    docs = [{"text": d} for d in documents[:30]]
    docs[14]["text"] += " <kill> "  # the second part's fifth document
    write_jsonl(tmp_path / "raw" / "docs.jsonl", docs)
    instances = tmp_path / "instances"
    run_prepare(PrepareConfig(inputs=[str(tmp_path / "raw")], output=str(instances), max_chars=1500,
                              rows_per_part=10))
    parts = [p["name"] for p in io.read_json(str(instances / io.MANIFEST))["parts"]]
    bad = next(p for p in parts if "<kill>" in " ".join(pq.read_table(instances / p)["text"].to_pylist()))

    def config(output, **kw):
        return ScoreConfig(instances=str(instances), model=str(model_dir), output=str(output),
                           **SCORE_SETTINGS, trust_remote_code=True, **kw)

    switch.touch()
    with pytest.raises(PartKillsWorker, match=rf"^part {bad} \(instances file {instances / bad}\): .* died 2 times") as failure:
        run_score(config(tmp_path / "run", max_tries=2))
    assert "re-run" in str(failure.value)
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("part-*.parquet")}
    assert bad not in kept and not (tmp_path / "run" / io.MANIFEST).exists()

    switch.unlink()  # the cause is fixed: the same command resumes
    rescored = []
    resumed = run_score(config(tmp_path / "run", max_tries=2), on_part_written=rescored.append)
    assert bad in rescored and set(rescored) == set(parts) - set(kept)
    assert all((tmp_path / "run" / n).stat().st_mtime_ns == t for n, t in kept.items())
    assert resumed["rows"] == io.read_json(str(instances / io.MANIFEST))["instances"]
    assert_scores_equal_model_loss(read_table(tmp_path / "run"), instances, model_dir, trust_remote_code=True)


@pytest.mark.timeout(400)
def test_a_worker_that_dies_loading_the_model_is_retried_a_bounded_number_of_times(
        instances, tokenizer_dir, tmp_path, ray_session):
    deaths = tmp_path / "deaths"
    deaths.mkdir()
    model_dir = save_killer_model(tokenizer_dir, tmp_path / "model", tmp_path / "no_switch", deaths_on_load=deaths)

    def config(output):
        return ScoreConfig(instances=str(instances), model=str(model_dir), output=str(output),
                           **SCORE_SETTINGS, trust_remote_code=True, max_tries=2)

    (deaths / "1").touch()  # one death on load (a transient OOM, a node lost): the run goes on
    manifest = run_score(config(tmp_path / "once"))
    assert not os.listdir(deaths) and manifest["rows"] == io.read_json(str(instances / io.MANIFEST))["instances"]
    assert_scores_equal_model_loss(read_table(tmp_path / "once"), instances, model_dir, trust_remote_code=True)

    for i in range(5):  # dies at every load: stopped after max_tries, naming the model
        (deaths / str(i)).touch()
    with pytest.raises(RuntimeError, match=rf"scoring worker died 2 times while loading {model_dir}"):
        run_score(config(tmp_path / "always"))
    assert len(os.listdir(deaths)) == 3  # 2 loads tried (max_tries), not forever
    assert not list((tmp_path / "always").glob("part-*.parquet"))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


@cuda
def test_cuda_model_loads_in_bf16_straight_onto_the_gpu(llama_dir):
    from miniplm.models import load_model

    model = load_model(str(llama_dir), device="cuda", dtype="auto")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@cuda
@pytest.mark.parametrize("packing", ["padded", "packed"])
def test_cuda_scores_equal_cpu_scores_and_repeat_bit_for_bit(llama_dir, documents, packing):
    from miniplm.models import load_model
    from miniplm.scoring.logprob import SequenceScorer

    model, tok, _, seqs = load_scorer_inputs(llama_dir, documents, n=12)

    def scorer(model):
        return SequenceScorer(model, max_length=64, stride=32, batch_tokens=512,
                              prefix_id=tok.bos_token_id, packing=packing)

    cpu = scorer(model).score(seqs)
    fp32 = scorer(load_model(str(llama_dir), device="cuda", dtype="float32"))
    first = fp32.score(seqs)
    assert first.tobytes() == fp32.score(seqs).tobytes()  # no atomics in the reduction
    np.testing.assert_allclose(first, cpu, rtol=1e-4)
    bf16 = scorer(load_model(str(llama_dir), device="cuda", dtype="bfloat16")).score(seqs)
    np.testing.assert_allclose(bf16, cpu, rtol=5e-2)  # bf16 weights, float32 log-softmax


@cuda
def test_cuda_score_stage_shares_one_gpu_between_two_workers(instances, llama_dir, tmp_path):
    cpu = score(instances, llama_dir, tmp_path / "cpu", device="cpu")
    gpu = score(instances, llama_dir, tmp_path / "gpu", device="cuda", dtype="float32", workers=2,
                gpus_per_worker=0.5)
    assert gpu["rows"] == cpu["rows"]
    np.testing.assert_allclose(read_table(tmp_path / "gpu")["logprob"].to_numpy(),
                               read_table(tmp_path / "cpu")["logprob"].to_numpy(), rtol=1e-4)


def test_model_fingerprint_is_remembered_by_file_identity(llama_dir, tmp_path, monkeypatch):
    """A no-op re-run does not read the weights again; a checkpoint rewritten in place is read."""
    from miniplm.models import model_fingerprint

    monkeypatch.setenv("MINIPLM_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    first = model_fingerprint(str(model))
    weights = model / "model.safetensors"
    st = weights.stat()
    with open(weights, "r+b") as f:  # same size, same inode, same mtime: the same identity
        f.seek(st.st_size - 8)
        f.write(b"\0" * 8)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model_fingerprint(str(model)) == first  # remembered: the weights were not read
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert model_fingerprint(str(model)) != first  # a new mtime: read again, new content seen
