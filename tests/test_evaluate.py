"""eval: held-out loss from the score stage, bits per byte, lm-eval offline on a local task."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
from conftest import SCORE_SETTINGS, write_jsonl
from test_score import reference_logprob
from transformers import AutoModelForCausalLM, AutoTokenizer

from miniplm.evaluate import EvalConfig, run_eval
from miniplm.prepare import PrepareConfig, run_prepare


@pytest.fixture(scope="module")
def heldout(documents, tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("heldout")
    write_jsonl(root / "raw" / "h.jsonl", [{"text": d[:300]} for d in documents[200:215]])
    run_prepare(PrepareConfig(inputs=[str(root / "raw")], output=str(root / "inst")))
    return root


def test_eval_loss_equals_model_loss_and_bits_per_byte(heldout, llama_dir, tmp_path):
    result = run_eval(EvalConfig(model=str(llama_dir), data=str(heldout / "inst"),
                                 output=str(tmp_path / "eval.json"), cpus_per_worker=0.5))
    assert json.loads((tmp_path / "eval.json").read_text())["loss_per_token"] == result["loss_per_token"]
    # independent: the model's own loss (HF labels=), windowed as in the perplexity guide
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(llama_dir)
    texts = [json.loads(line)["text"] for line in (heldout / "raw" / "h.jsonl").read_text().splitlines()]
    per_text = [reference_logprob(model, tok, t, 64, 32) for t in texts]
    tokens = sum(n for _, n in per_text)
    assert tokens == result["tokens"]
    assert result["loss_per_token"] == pytest.approx(-sum(lp for lp, _ in per_text) / tokens, rel=1e-5)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert result["bytes"] == n_bytes
    assert result["bits_per_byte"] == pytest.approx(
        result["loss_per_token"] * result["tokens"] / (math.log(2) * n_bytes), rel=1e-9)
    assert result["provenance"]["model"] == str(llama_dir)


def test_eval_loss_matches_score_stage(instances, llama_dir, llama_scores, tmp_path):
    """The same numbers as a plain score run (the session's table of the same instances, model
    and settings): eval is the score stage, not a second implementation."""
    import pyarrow.parquet as pq

    from miniplm import io

    scores, folder = llama_scores
    result = run_eval(EvalConfig(model=str(llama_dir), data=str(instances), output=str(tmp_path / "e.json"),
                                 **SCORE_SETTINGS))
    logprob = sum(pq.read_table(folder / p["name"])["logprob"].to_numpy().sum() for p in scores["parts"])
    assert result["loss_per_token"] == pytest.approx(-logprob / scores["tokens"], rel=1e-12)
    assert io.read_json(str(tmp_path / "e.json"))["tokens"] == scores["tokens"]


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                    reason="lm-eval not installed (pip install 'miniplm[eval]')")
@pytest.mark.timeout(600)
def test_lm_eval_runs_offline_on_local_task(heldout, llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    items = [{"question": "The capital of France is", "choices": [" Paris", " banana"], "answer": 0},
             {"question": "Two plus two equals", "choices": [" four", " purple"], "answer": 0},
             {"question": "Water is", "choices": [" dry", " wet"], "answer": 1},
             {"question": "The sun rises in the", "choices": [" east", " sandwich"], "answer": 0}]
    write_jsonl(tmp_path / "items.jsonl", items)
    (tmp_path / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'items.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    result = run_eval(EvalConfig(model=str(llama_dir), data=str(heldout / "inst"),
                                 output=str(tmp_path / "eval.json"), cpus_per_worker=0.5, device="cpu",
                                 tasks=[str(tmp_path / "tiny_mc.yaml")]))
    assert 0.0 <= result["tasks"]["tiny_mc"]["acc"] <= 1.0
