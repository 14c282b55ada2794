"""prepare: raw files -> instances, with bad rows counted, strict mode, chunking and resume."""

from __future__ import annotations

import json
import random
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from miniplm import io
from miniplm.cli import user_message
from miniplm.prepare import BadRecord, PrepareConfig, run_prepare, split_text


def read_instances(root) -> pa.Table:
    manifest = io.read_json(io.join(str(root), io.MANIFEST))
    return pa.concat_tables(pq.read_table(root / p["name"]) for p in manifest["parts"])


def test_split_text_is_lossless_and_bounded(documents):
    text = "\n\n".join(documents[:40])
    pieces = split_text(text, 500)
    assert "".join(pieces) == text
    assert all(len(p) <= 500 for p in pieces)
    # cuts land on whitespace boundaries: no piece ends inside a word
    assert all(p[-1].isspace() for p in pieces[:-1])
    assert split_text("x" * 1200, 500) == ["x" * 500, "x" * 500, "x" * 200]
    assert split_text("short", 500) == ["short"]


@pytest.fixture()
def messy_corpus(tmp_path, documents):
    """One file per format, each with the kinds of bad rows real corpora have."""
    root = tmp_path / "raw"
    good = documents[:6]
    lines = [json.dumps({"text": good[0]}), "{not json", json.dumps({"body": "no text field"}),
             json.dumps({"text": None}), json.dumps({"text": 42}), json.dumps({"text": "   "}),
             json.dumps({"text": good[1]})]
    root.mkdir()
    (root / "web.jsonl").write_bytes(("\n".join(lines) + "\n").encode()
                                     + b'{"text": "bad \xff\xfe bytes"}\n'
                                     + (json.dumps({"text": good[2]}) + "\n").encode())
    pq.write_table(pa.table({"text": [good[3], None, "", good[4]], "n": [1, 2, 3, 4]}),
                   root / "books.parquet")
    (root / "notes.txt").write_text(good[5])
    (root / "broken.txt").write_bytes(b"\xff\xfe not utf-8")
    return root


def test_bad_rows_are_counted_not_fatal(messy_corpus, tmp_path, ray_session):
    out = tmp_path / "instances"
    manifest = run_prepare(PrepareConfig(inputs=[str(messy_corpus)], output=str(out)))
    assert manifest["skipped"] == {"empty_text": 2, "invalid_json": 1, "invalid_utf8": 2,
                                   "missing_text": 1, "non_string_text": 1, "null_text": 2}
    assert manifest["documents"] == 6
    table = read_instances(out)
    assert table.num_rows == manifest["instances"] == 6
    ids = set(table["id"].to_pylist())
    # ids name the file, the row (0-based line) and the chunk
    assert {"web.jsonl:0:0", "web.jsonl:6:0", "web.jsonl:8:0", "books.parquet:0:0",
            "books.parquet:3:0", "notes.txt:0:0"} == ids
    assert set(table["source"].to_pylist()) == {"web", "books", "notes"}
    for text, n_bytes in zip(table["text"].to_pylist(), table["n_bytes"].to_pylist()):
        assert n_bytes == len(text.encode())


def test_strict_names_file_and_line(messy_corpus, tmp_path, ray_session):
    with pytest.raises(BadRecord) as info:  # raised in a Ray task, reaches the driver as itself
        run_prepare(PrepareConfig(inputs=[str(messy_corpus / "web.jsonl")],
                                  output=str(tmp_path / "o"), strict=True))
    assert user_message(info.value).endswith("web.jsonl, line 2: invalid json")
    with pytest.raises(BadRecord, match="line 2: invalid json"):
        from miniplm.prepare import prepare_file
        prepare_file(str(messy_corpus / "web.jsonl"), "web.jsonl", 0,
                     PrepareConfig(inputs=["x"], output=str(tmp_path / "p"), strict=True))


def test_long_documents_split_and_rerun_is_noop(corpus_dir, tmp_path, ray_session, capsys):
    cfg = PrepareConfig(inputs=[str(corpus_dir / "*.jsonl")], output=str(tmp_path / "inst"),
                        max_chars=1000, rows_per_part=100)
    manifest = run_prepare(cfg)
    table = read_instances(tmp_path / "inst")
    assert max(len(t) for t in table["text"].to_pylist()) <= 1000
    assert manifest["instances"] > manifest["documents"]  # some documents were split
    assert len(manifest["parts"]) > 2 and sum(p["rows"] for p in manifest["parts"]) == table.num_rows
    assert len(set(table["id"].to_pylist())) == table.num_rows
    # chunks of one document concatenate back to it
    first_doc = [r for r in table.to_pylist() if r["id"].startswith("docs_a.jsonl:0:")]
    original = json.loads((corpus_dir / "docs_a.jsonl").read_text().splitlines()[0])["text"]
    assert "".join(r["text"] for r in sorted(first_doc, key=lambda r: int(r["id"].split(":")[2]))) == original

    capsys.readouterr()
    assert run_prepare(cfg)["fingerprint"] == manifest["fingerprint"]
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(ValueError, match="different settings"):
        run_prepare(PrepareConfig(inputs=cfg.inputs, output=cfg.output, max_chars=2000))


def test_resume_after_kill_matches_clean_run(corpus_dir, tmp_path, ray_session):
    """A run killed after one file finished: the re-run redoes only the other file."""
    from miniplm import prepare

    cfg = PrepareConfig(inputs=[str(corpus_dir)], output=str(tmp_path / "a"), rows_per_part=40)
    clean = run_prepare(PrepareConfig(inputs=cfg.inputs, output=str(tmp_path / "clean"),
                                      rows_per_part=40))
    # simulate the kill: only file 0 finished (its parts and marker), a stray tmp file left
    urls = prepare.expand_inputs(cfg.inputs)
    io.claim_output(cfg.output, prepare.job_record(cfg, urls), overwrite=False, what="instances")
    prepare.prepare_file(urls[0], "docs_a.jsonl", 0, cfg)
    (tmp_path / "a" / io.TMP).mkdir(exist_ok=True)
    (tmp_path / "a" / io.TMP / "part-00001-00000.parquet.123").write_bytes(b"half")
    marker = tmp_path / "a" / prepare.DONE / "00000.json"
    before = marker.stat().st_mtime_ns
    resumed = run_prepare(cfg)
    assert marker.stat().st_mtime_ns == before  # file 0 was not redone
    assert resumed["fingerprint"] == clean["fingerprint"]
    assert resumed["instances"] == clean["instances"]
    assert read_instances(tmp_path / "a").sort_by("id").equals(read_instances(tmp_path / "clean").sort_by("id"))
    assert not (tmp_path / "a" / io.TMP).exists()


def test_fingerprint_tracks_content(tmp_path, ray_session):
    write_jsonl(tmp_path / "c1" / "x.jsonl", [{"text": "alpha beta"}, {"text": "gamma"}])
    write_jsonl(tmp_path / "c2" / "x.jsonl", [{"text": "alpha beta"}, {"text": "gamma!"}])
    a = run_prepare(PrepareConfig(inputs=[str(tmp_path / "c1")], output=str(tmp_path / "o1")))
    b = run_prepare(PrepareConfig(inputs=[str(tmp_path / "c2")], output=str(tmp_path / "o2")))
    c = run_prepare(PrepareConfig(inputs=[str(tmp_path / "c1" / "x.jsonl")], output=str(tmp_path / "o3")))
    assert a["fingerprint"] != b["fingerprint"]
    assert a["fingerprint"] == c["fingerprint"]  # same files, given as folder or as file


def test_bad_config_fails_before_work(tmp_path):
    with pytest.raises(ValueError, match="max_chars"):
        PrepareConfig(inputs=["x"], output=str(tmp_path), max_chars=0)
    with pytest.raises(FileNotFoundError, match="no such file"):
        run_prepare(PrepareConfig(inputs=[str(tmp_path / "missing.jsonl")], output=str(tmp_path / "o")))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown corpus format"):
        run_prepare(PrepareConfig(inputs=[str(tmp_path / "data.csv")], output=str(tmp_path / "o")))


def split_text_by_definition(text: str, max_chars: int) -> list[str]:
    """split_text as first written (quadratic: each cut copies the rest): the output that the
    linear split_text must reproduce exactly."""
    pieces = []
    while len(text) > max_chars:
        window = text[:max_chars]
        cut = 0
        for sep in ("\n\n", "\n", " ", "\t"):
            pos = window.rfind(sep)
            if pos + len(sep) > max_chars // 2:
                cut = pos + len(sep)
                break
        cut = cut or max_chars
        pieces.append(text[:cut])
        text = text[cut:]
    pieces.append(text)
    return [p for p in pieces if p.strip()]


def test_split_text_is_linear_and_keeps_its_cuts():
    rng = random.Random(0)
    alphabet = ["a", "bc", " ", "\n", "\n\n", "\t", "é", "日本", "🙂", " \n "]
    for max_chars in (1, 2, 3, 5, 8, 17, 64):
        for _ in range(60):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 200)))
            assert split_text(text, max_chars) == split_text_by_definition(text, max_chars)
    text = "a " * 20_000_000  # 40 M characters: cutting by copying the rest took 51 s here
    start = time.perf_counter()
    pieces = split_text(text, 8192)
    assert time.perf_counter() - start < 2.0
    assert len(pieces) == 4883 and "".join(pieces) == text

