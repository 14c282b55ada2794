"""eval: held-out loss from the score stage, bits per byte, lm-eval offline on a local task."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
from conftest import SCORE_SETTINGS, write_jsonl
from test_score import reference_logprob
from transformers import AutoModelForCausalLM, AutoTokenizer

from miniplm.data.prepare import PrepareConfig, run_prepare
from miniplm.evaluation.evaluate import EvalConfig, run_eval


@pytest.fixture(scope="module")
def heldout(documents, tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("heldout")
    write_jsonl(root / "raw" / "h.jsonl", [{"text": d[:300]} for d in documents[200:215]])
    run_prepare(PrepareConfig(inputs=[str(root / "raw")], output=str(root / "inst")))
    return root


HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None

TINY_MC = [{"question": "The capital of France is", "choices": [" Paris", " banana"], "answer": 0},
           {"question": "Two plus two equals", "choices": [" four", " purple"], "answer": 0},
           {"question": "Water is", "choices": [" dry", " wet"], "answer": 1},
           {"question": "The sun rises in the", "choices": [" east", " sandwich"], "answer": 0}]


def write_local_task(folder) -> str:
    """A multiple-choice lm-eval task read from a local JSONL file: no download."""
    write_jsonl(folder / "items.jsonl", TINY_MC)
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'items.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    return str(folder / "tiny_mc.yaml")


@pytest.fixture(scope="module")
def evaluated(heldout, llama_dir, tmp_path_factory):
    """One `eval` of the tiny Llama on the held-out set, with a local lm-eval task where the
    `eval` extra is installed (offline: the task's data is a local file): (result, output)."""
    out = tmp_path_factory.mktemp("eval")
    tasks = [write_local_task(out)] if HAS_LM_EVAL else []
    with pytest.MonkeyPatch.context() as mp:  # module scope: the function-scoped fixture is not available
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        result = run_eval(EvalConfig(model=str(llama_dir), data=str(heldout / "inst"), output=str(out / "eval.json"),
                                     cpus_per_worker=0.5, device="cpu", tasks=tasks))
    return result, out / "eval.json"


@pytest.mark.timeout(600)
def test_eval_loss_equals_model_loss_and_bits_per_byte(evaluated, heldout, llama_dir):
    result, output = evaluated
    assert json.loads(output.read_text())["loss_per_token"] == result["loss_per_token"]
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


@pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval not installed (pip install 'miniplm[eval]')")
def test_lm_eval_runs_offline_on_local_task(evaluated):
    result, _ = evaluated
    assert 0.0 <= result["tasks"]["tiny_mc"]["acc"] <= 1.0
