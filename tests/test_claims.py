"""The claims benchmark (jobs/bench_claims.py): its evaluation sets, its verdicts, and its quick
mode end to end on the quick demo."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from miniplm import io
from miniplm.evaluation.evalsets import Decontaminator, bits_per_byte, capped, outside_prose
from miniplm.studies.claims import C7_DATA, data_needed, verdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def words(n: int, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


def test_a_near_duplicate_of_training_text_is_dropped_and_a_shared_phrase_is_not():
    training = [words(100)]
    guard = Decontaminator(training)
    copy = words(100).upper()                  # the same words: every 13-gram is in training
    half = words(40) + " " + words(40, 1000)   # 28 of its 68 13-grams in training: < half
    most = words(60) + " " + words(20, 1000)   # 48 of 68: more than half
    fresh = words(50, 5000)
    kept, dropped = guard.clean([copy, half, most, fresh])
    assert kept == [half, fresh] and dropped == 2
    assert guard.overlap(half) == pytest.approx(28 / 68) and guard.overlap(fresh) == 0.0


def test_outside_prose_is_english_prose_from_none_of_the_corpus_sources():
    texts = outside_prose()
    assert len(texts) > 50 and sum(map(len, texts)) > 200_000
    # prose: mostly words, not code or install records
    sample = " ".join(texts)
    assert len(re.findall(r"\b(the|is|of|and|a)\b", sample)) / len(sample.split()) > 0.1
    picked = capped(texts, 20_000, "outside-prose")
    assert 20_000 <= sum(len(t.encode()) for t in picked) < 20_000 + max(len(t.encode()) for t in texts)
    assert picked == capped(list(reversed(texts)), 20_000, "outside-prose")  # the order is the seed's


def test_bits_per_byte_is_the_models_own_loss(llama_dir, documents):
    """Independently: HF's own labels= loss over the prefixed ids, short texts within the context."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = [d[:80] for d in documents[:6]]
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(llama_dir)
    total = 0.0
    for text in texts:
        ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
        assert ids.shape[1] <= 64
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        total += loss * (ids.shape[1] - 1)
    expected = total / (math.log(2) * sum(len(t.encode()) for t in texts))
    assert bits_per_byte(str(llama_dir), {"a": texts})["a"] == pytest.approx(expected, rel=1e-4)


def test_verdicts_follow_the_rule():
    assert verdict([3.0, 3.1, 3.2], [2.8, 2.9, 3.0])["verdict"] == "holds"  # gain 0.2 > sd 0.1
    noisy = verdict([3.0, 3.4, 3.8], [2.9, 3.3, 3.7])                     # gain 0.1 < sd 0.4
    assert noisy["verdict"] == "holds on average" and noisy["held"] == 3
    assert verdict([3.0, 3.0], [3.1, 2.95])["verdict"] == "does not hold"  # mean gain -0.025
    assert verdict([3.0, 3.0], [3.1, 2.95])["gains"] == pytest.approx([-0.1, 0.05])


def test_data_needed_interpolates_in_log_data():
    def row(value):
        return {"seeds": [0], "bits_per_byte": {"s": [value]}}

    # vanilla on 0.5x, 1x and 2x the refined corpus's unique data: 4.0, 3.8, 3.6; MiniPLM 3.7
    rows = {"vanilla-quarter": row(4.0), "vanilla-half": row(3.8), "vanilla": row(3.6), "miniplm": row(3.7)}
    assert set(C7_DATA) == {"vanilla-quarter", "vanilla-half", "vanilla"}
    got = data_needed(rows, ["s"], [0], alpha=0.5)["s"]
    assert got["needed"] == pytest.approx(math.sqrt(2))  # halfway between 1x and 2x in log data
    rows["miniplm"] = row(3.5)                            # better than vanilla on all of it
    got = data_needed(rows, ["s"], [0], alpha=0.5)["s"]
    assert got["needed"] is None and got["beyond"] == "above"


@pytest.mark.timeout(900)
def test_quick_study_trains_every_arm_at_the_flops_it_should(demo_run, ray_session):
    """`python jobs/bench_claims.py --quick` on the quick demo, C1 and C3 (plain arms and the
    equal-FLOPs KD arm; the suite's time allows three arms): every arm trains for each of 2
    seeds, the KD arm spends the plain arm's FLOPs within 2%, and the table has a row per arm and
    claim. The cross-family arm's model is checked on its own below."""
    import ray

    out, _ = demo_run
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    result = subprocess.run([sys.executable, os.path.join(REPO, "jobs", "bench_claims.py"), "--quick",
                             "--output", str(out), "--claims", "C1", "C3"],
                            env=env, capture_output=True, text=True, timeout=880)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = io.read_json(str(out / "claims" / "report-65536" / "claims.json"))
    arms = {"vanilla", "miniplm", "vanilla-kd"}
    assert set(summary["arms"]) == arms
    sets = [s["name"] for s in summary["sets"]]
    assert sets == ["heldout", "docs", "code", "license", "outside-prose"]
    for name, row in summary["arms"].items():
        assert row["seeds"] == [0, 1]
        for seed in (0, 1):
            run = out / "claims" / "students" / f"{name}-65536-s{seed}"
            assert (run / "final" / "config.json").exists(), run
        for s in sets:
            assert all(math.isfinite(v) and 0 < v < 10 for v in row["bits_per_byte"][s]), (name, s)
    # equal FLOPs: the KD student takes fewer steps for the teacher's forward passes
    kd, plain = summary["arms"]["vanilla-kd"], summary["arms"]["vanilla"]
    assert kd["steps"] < plain["steps"] == 64
    assert abs(kd["flops"] / plain["flops"] - 1) < 0.02
    assert [c["claim"] for c in summary["claims"]] == ["C1", "C3"]
    for c in summary["claims"]:
        assert set(c["per_set"]) == set(sets)
        for v in c["per_set"].values():
            assert v["n"] == 2 and v["verdict"] in ("holds", "holds on average", "does not hold")
    table = (out / "claims" / "report-65536" / "claims.md").read_text()
    assert table.count("\n| C") == 2 and all(f"| {a} |" in table for a in arms)
    assert (out / "claims" / "report-65536" / "claims.png").stat().st_size > 0
    assert "| C1 | MiniPLM < vanilla" in result.stdout


def test_the_cross_family_student_is_a_qwen2_with_its_tokenizers_vocabulary(tmp_path, tokenizer_dir):
    """C5's student: another family (Qwen2, where the demo's are Llama) of the tiny shape, sized
    to the tokenizer it is given, and accepted by the train stage's own model check."""
    from transformers import AutoTokenizer

    from miniplm.models import ModelSpec, load_tokenizer, model_config
    from miniplm.studies.claims import ARMS, SIZES, model_file

    path = model_file(str(tmp_path), ARMS["miniplm-cross"], str(tokenizer_dir), seq_len=64)
    config = io.read_json(path)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert config["model_type"] == "qwen2" and config["vocab_size"] == len(tok)
    assert config["hidden_size"] == SIZES["tiny"]["hidden_size"] == 64
    assert config["num_hidden_layers"] == 2 and config["tie_word_embeddings"] is True
    assert config["bos_token_id"] == tok.bos_token_id and config["eos_token_id"] == tok.eos_token_id
    built = model_config(ModelSpec(preset=None, config=path, tokenizer=str(tokenizer_dir)),
                         load_tokenizer(str(tokenizer_dir)), 64)
    assert built.model_type == "qwen2"
