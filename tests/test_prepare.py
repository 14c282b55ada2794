"""prepare: raw files -> instances, with bad rows counted, strict mode, chunking and resume."""

from __future__ import annotations

import collections
import dataclasses
import json
import posixpath
import random
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from miniplm import io
from miniplm.cli import user_message
from miniplm.data import prepare
from miniplm.data.prepare import INSTANCE_SCHEMA, BadRecord, PrepareConfig, run_prepare, split_text


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
        from miniplm.data.prepare import prepare_file
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
    from miniplm.data import prepare

    cfg = PrepareConfig(inputs=[str(corpus_dir)], output=str(tmp_path / "a"), rows_per_part=40)
    clean = run_prepare(PrepareConfig(inputs=cfg.inputs, output=str(tmp_path / "clean"),
                                      rows_per_part=40))
    # simulate the kill: only file 0 finished (its parts and marker), a stray tmp file left
    urls = prepare.expand_inputs(cfg.inputs)
    with io.claim_output(cfg.output, prepare.job_record(cfg, urls), overwrite=False, what="instances"):
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


def test_a_compression_fsspec_cannot_read_fails_before_work(tmp_path, monkeypatch):
    """fsspec knows .zst only while `zstandard` is installed; without it, `compression="infer"`
    opened a .jsonl.zst as its compressed bytes and every row was counted bad. The codec is
    taken away here, so the test holds whether or not zstandard is installed."""
    import fsspec.utils

    monkeypatch.delitem(fsspec.utils.compressions, "zst", raising=False)
    (tmp_path / "shard-000.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd compressed")
    with pytest.raises(ValueError, match=r"shard-000\.jsonl\.zst: .*pip install zstandard"):
        prepare.expand_inputs([str(tmp_path / "*.jsonl.zst")])
    with pytest.raises(ValueError, match="pip install zstandard"):  # a folder holding one too
        prepare.expand_inputs([str(tmp_path)])


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


def read_parts(output, stats: dict) -> pa.Table:
    tables = [pq.read_table(output / p["name"]) for p in stats["parts"]]
    return pa.concat_tables(tables) if tables else INSTANCE_SCHEMA.empty_table()


def test_txt_document_streams_in_blocks_with_the_cuts_of_the_whole(tmp_path, documents, monkeypatch):
    """A one-document .txt file is read in blocks; its chunks and ids are those of split_text
    on the whole text, with characters and paragraph breaks cut across blocks."""
    text = ("\n\n".join(documents[:30]) + " déjà vu 日本語 🙂" * 40 + "x" * 1300
            + "\n" * 1200 + "\t end \n\n")  # a hard cut, and a whitespace run that is dropped
    (tmp_path / "book.txt").write_bytes(text.encode())
    (tmp_path / "late.txt").write_bytes(text.encode() + b"\xff")  # bad byte after many blocks
    (tmp_path / "blank.txt").write_bytes(b" \n\t" * 100)
    monkeypatch.setattr(prepare, "READ_BLOCK", 7)
    cfg = PrepareConfig(inputs=["x"], output=str(tmp_path / "o"), max_chars=500, rows_per_part=40)
    stats = prepare.prepare_file(str(tmp_path / "book.txt"), "book.txt", 0, cfg)
    expected = split_text(text, 500)
    table = read_parts(tmp_path / "o", stats)
    assert table["text"].to_pylist() == expected
    assert table["id"].to_pylist() == [f"book.txt:0:{k}" for k in range(len(expected))]
    assert stats["documents"] == 1 and stats["instances"] == len(expected) > 40
    # a whole document is kept or skipped: a bad byte anywhere, or no text at all, skips it
    late = prepare.prepare_file(str(tmp_path / "late.txt"), "late.txt", 1, cfg)
    blank = prepare.prepare_file(str(tmp_path / "blank.txt"), "blank.txt", 2, cfg)
    assert (late["skipped"], late["parts"]) == ({"invalid_utf8": 1}, [])
    assert (blank["skipped"], blank["parts"]) == ({"empty_text": 1}, [])


def test_line_over_max_line_bytes_is_skipped_as_too_long(tmp_path, monkeypatch):
    long_doc = "y " * 600
    write_jsonl(tmp_path / "web.jsonl", [{"text": "short"}, {"text": long_doc}, {"text": "after"}])
    (tmp_path / "lines.txt").write_text(f"short\n{long_doc}\nafter")
    monkeypatch.setattr(prepare, "READ_BLOCK", 64)  # the long line spans many blocks
    cfg = PrepareConfig(inputs=["x"], output=str(tmp_path / "o"), max_line_bytes=1000, lines=True)
    for i, name in enumerate(["web.jsonl", "lines.txt"]):
        stats = prepare.prepare_file(str(tmp_path / name), name, i, cfg)
        assert stats["skipped"] == {"too_long": 1}
        assert read_parts(tmp_path / "o", stats)["id"].to_pylist() == [f"{name}:0:0", f"{name}:2:0"]
        with pytest.raises(BadRecord, match=f"{name}, line 2: too long"):
            prepare.prepare_file(str(tmp_path / name), name, i, dataclasses.replace(cfg, strict=True))
    with pytest.raises(ValueError, match="max_line_bytes"):
        PrepareConfig(inputs=["x"], output=str(tmp_path), max_line_bytes=0)


def test_json_array_and_lines_read_in_any_block_size(tmp_path, documents, monkeypatch):
    """Records split out of a JSON array by tracking strings and nesting, and JSON lines read
    in blocks, are the records json.loads sees, wherever the blocks cut them."""
    texts = [documents[0], 'quotes " and \\ backslashes \\', "ends on a backslash \\",
             "brackets ] } [ { and , commas", "déjà 日本 🙂", documents[1][:300]]
    records = [{"text": t, "meta": {"n": [i, {"x": "]"}], "s": "\\\""}} for i, t in enumerate(texts)]
    (tmp_path / "a.json").write_text(json.dumps(records, indent=2))
    (tmp_path / "b.json").write_text(json.dumps(records, ensure_ascii=False))
    write_jsonl(tmp_path / "c.jsonl", records)
    cfg = PrepareConfig(inputs=["x"], output=str(tmp_path / "o"), max_chars=10_000)
    for block in (1, 2, 3, 7, 64, 1 << 20):
        monkeypatch.setattr(prepare, "READ_BLOCK", block)
        for name in ("a.json", "b.json", "c.jsonl"):
            rows = list(prepare.read_rows(str(tmp_path / name), cfg))
            assert rows == [(i, t, None) for i, t in enumerate(texts)], (name, block)
    (tmp_path / "empty.json").write_text(" [ ] ")
    (tmp_path / "after.json").write_text('[{"text": "kept"}] [{"text": "lost"}]')
    assert list(prepare.read_rows(str(tmp_path / "empty.json"), cfg)) == []
    assert list(prepare.read_rows(str(tmp_path / "after.json"), cfg)) == [
        (0, "kept", None), (1, None, "invalid_json")]


DEEP = b'{"text": "deep", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}"
BAD_LINES = {  # one JSON line of each bad kind, and the reason it is counted under
    "too_deep": DEEP,  # json.loads raises RecursionError
    "invalid_unicode": rb'{"text": "a\ud800b"}',  # a lone surrogate: no UTF-8 for it
    "invalid_json": b'{"text": "x", "n": ' + b"1" * 5000 + b"}",  # past int_max_str_digits
    "invalid_utf8": b'{"text": "bad \xff bytes"}',
    "too_long": b'{"text": "' + b"z" * 12_000 + b'"}',  # over max_line_bytes=10_000
}


@pytest.fixture()
def bad_rows_corpus(tmp_path):
    """A JSONL file with one row of each bad kind between good ones, and a JSON array with bad
    records, cut off in its last record."""
    root = tmp_path / "bad"
    root.mkdir()
    (root / "rows.jsonl").write_bytes(b"\n".join([b'{"text": "good one"}', *BAD_LINES.values(),
                                                  b'{"text": "good two"}']) + b"\n")
    (root / "array.json").write_bytes(b'[{"text": "first"}, {"text": "s\\udc00"}, {not json}, '
                                      + DEEP + b', {"text": "last whole"}, {"text": "cut he')
    return root


def test_every_bad_row_kind_is_counted(bad_rows_corpus, tmp_path, ray_session):
    manifest = run_prepare(PrepareConfig(inputs=[str(bad_rows_corpus)], output=str(tmp_path / "o"),
                                         max_line_bytes=10_000))
    assert manifest["skipped"] == {"invalid_json": 2, "invalid_unicode": 2, "invalid_utf8": 1,
                                   "too_deep": 2, "too_long": 1, "truncated_json": 1}
    table = read_instances(tmp_path / "o")
    assert sorted(zip(table["id"].to_pylist(), table["text"].to_pylist())) == [
        ("array.json:0:0", "first"), ("array.json:4:0", "last whole"),
        ("rows.jsonl:0:0", "good one"), ("rows.jsonl:6:0", "good two")]


def test_strict_names_file_and_line_of_each_bad_kind(tmp_path):
    cfg = PrepareConfig(inputs=["x"], output=str(tmp_path / "o"), strict=True, max_line_bytes=10_000)
    for reason, line in BAD_LINES.items():
        path = tmp_path / f"{reason}.jsonl"
        path.write_bytes(b'{"text": "fine"}\n' + line + b"\n")
        with pytest.raises(BadRecord, match=f"{reason}.jsonl, line 2: {reason.replace('_', ' ')}$"):
            prepare.prepare_file(str(path), path.name, 0, cfg)
    (tmp_path / "cut.json").write_bytes(b'[{"text": "fine"}, {"text": "cut')
    with pytest.raises(BadRecord, match="cut.json, line 2: truncated json$"):
        prepare.prepare_file(str(tmp_path / "cut.json"), "cut.json", 0, cfg)


RSS_SCRIPT = """
import json, pathlib, resource, sys
from miniplm.data.prepare import PrepareConfig, expand_inputs, prepare_file, relative_names
cfg = PrepareConfig(inputs=[sys.argv[1]], output=sys.argv[2], rows_per_part=100)
urls = expand_inputs(cfg.inputs)
warm = pathlib.Path(sys.argv[3])
warm.write_text('{"text": "warm up"}\\n')
prepare_file(str(warm), "warm.jsonl", 99, cfg)  # Arrow's pool and the Parquet writer start once
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
stats = [prepare_file(u, r, i, cfg) for i, (u, r) in enumerate(zip(urls, relative_names(urls)))]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_mb": base / 1024, "peak_mb": peak / 1024, "stats": stats}))
"""


@pytest.mark.slow
def test_big_files_are_read_in_bounded_memory(bad_rows_corpus, documents, tmp_path):
    """150 MB of input in one process: a 50 MB one-line JSONL document (skipped, over the
    default 8 MB max_line_bytes, never held) and a 100 MB one-document .txt file (streamed and
    chunked), beside one row of each bad kind. Peak RSS stays within 64 MB of the RSS after
    imports and a warm-up file: one 1 MiB block, up to max_line_bytes of a line, one part of
    100 x 8192 characters with its Arrow copy (measured: +25 MB). Reading either big file
    whole would take 100 MB or more on its own."""
    mb = 1 << 20
    with open(bad_rows_corpus / "huge.jsonl", "wb") as f:
        f.write(b'{"text": "')
        for _ in range(50):
            f.write(b"word " * (mb // 5) + b"w" * (mb % 5))
        f.write(b'"}\n{"text": "after the huge line"}\n')
    prose = "\n\n".join(documents).encode()
    block = (prose * (mb // len(prose) + 1))[:mb]
    with open(bad_rows_corpus / "book.txt", "wb") as f:
        for _ in range(100):
            f.write(block)
    result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(bad_rows_corpus), str(tmp_path / "o"),
                             str(tmp_path / "warm.jsonl")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    stats = {posixpath.basename(s["file"]): s for s in report["stats"]}
    assert stats["huge.jsonl"]["skipped"] == {"too_long": 1} and stats["huge.jsonl"]["documents"] == 1
    assert stats["book.txt"]["documents"] == 1
    assert stats["book.txt"]["instances"] >= 100 * mb // 8192
    skipped = collections.Counter()
    for s in report["stats"]:
        skipped.update(s["skipped"])
    assert skipped == {"invalid_json": 2, "invalid_unicode": 2, "invalid_utf8": 1, "too_deep": 2,
                       "too_long": 1, "truncated_json": 1}  # the 12 kB line fits under 8 MB
    print(f"peak RSS {report['peak_mb']:.0f} MB, after imports {report['base_mb']:.0f} MB")
    assert report["peak_mb"] - report["base_mb"] < 64


# ---------------------------------------------------------------- corpora behind URLs


def prepare_each_file(pattern: str, output) -> tuple[list[str], list[tuple]]:
    """prepare's work on the files behind `pattern`, each file as its Ray task does it
    (`_prepare_files`), in this process: (the file URLs, sorted (id, text, source) rows)."""
    cfg = PrepareConfig(inputs=[pattern], output=str(output), max_chars=1000, rows_per_part=200)
    urls = prepare.expand_inputs(cfg.inputs)
    for i, (url, rel) in enumerate(zip(urls, prepare.relative_names(urls))):
        prepare.prepare_file(url, rel, i, cfg)
    table = pq.read_table(output, schema=INSTANCE_SCHEMA)  # every part-*.parquet (not _done/)
    return urls, sorted(zip(*(table[k].to_pylist() for k in ("id", "text", "source"))))


def random_prose(seed: int, words: list[str], n_docs: int) -> list[dict]:
    """Documents of words drawn at random: text gzip shrinks only about 3 times."""
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choices(words, k=rng.randint(50, 1500)))} for _ in range(n_docs)]


def test_an_s3_glob_of_compressed_jsonl_streams_through_fsspec(s3_server, documents, tmp_path, monkeypatch,
                                                               request):
    """`s3://bucket/prefix/*.jsonl.gz` on a real S3 API (moto's server on loopback, s3fs the
    client): the glob is expanded in the bucket (a file beside it that does not match is left
    out), and each object is read in ranged GETs, none of them the whole object and nothing
    written to disk, into the same instances as the same files on local disk. (.gz, not .zst:
    fsspec decompresses .zst only with `zstandard`, not installed here; the codec is the only
    difference.) s3fs reads ahead 50 MiB per open file by default; 64 KiB here lets a 0.75 MB
    object show that it is read in pieces (measured: 11 GETs of 36-72 KiB)."""
    import gzip

    import s3fs

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(s3fs.S3FileSystem, "default_block_size", 64 << 10)
    s3fs.S3FileSystem.clear_instance_cache()
    request.addfinalizer(s3fs.S3FileSystem.clear_instance_cache)  # no 64 KiB client left for later tests
    fetched = collections.defaultdict(list)
    fetch = s3fs.core.S3File._fetch_range

    def spy(self, start, end):
        fetched[self.path].append(end - start)
        return fetch(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", spy)

    words = " ".join(documents).split()
    local = tmp_path / "raw" / "prefix"
    local.mkdir(parents=True)
    for name, seed, n in [("web-00000.jsonl.gz", 0, 400), ("web-00001.jsonl.gz", 1, 30)]:
        lines = "".join(json.dumps(r) + "\n" for r in random_prose(seed, words, n))
        (local / name).write_bytes(gzip.compress(lines.encode()))
    write_jsonl(local / "notes.jsonl", [{"text": "not in the glob"}])
    fs = s3fs.S3FileSystem()
    fs.mkdir("corpus")
    fs.put(f"{local}/", "corpus/prefix/", recursive=True)

    urls, remote = prepare_each_file("s3://corpus/prefix/*.jsonl.gz", tmp_path / "from_s3")
    assert urls == ["s3://corpus/prefix/web-00000.jsonl.gz", "s3://corpus/prefix/web-00001.jsonl.gz"]
    _, on_disk = prepare_each_file(str(local / "*.jsonl.gz"), tmp_path / "from_disk")
    assert remote == on_disk and len(remote) > 400
    assert {i.split(":")[0] for i, _, _ in remote} == {"web-00000.jsonl.gz", "web-00001.jsonl.gz"}

    big = "corpus/prefix/web-00000.jsonl.gz"
    size = fs.size(big)
    assert size > 500_000, size
    assert len(fetched[big]) > 3 and max(fetched[big]) < size / 3  # pieces, never the whole object
    assert sum(fetched[big]) < 2 * size  # and each piece about once


def test_an_hf_glob_is_expanded_and_read_by_the_filesystem_behind_hf(tmp_path, monkeypatch):
    """`hf://datasets/org/name/data/*.parquet` reaches fsspec exactly as typed, and the glob is
    expanded and the files read by whatever filesystem serves `hf://`. That is huggingface_hub's
    HfFileSystem, which needs the network; here a local folder laid out as the dataset repo,
    registered under the same `hf` protocol, stands in for it. So this shows prepare's side (no
    rewriting, fsspec's glob, fsspec's open), not that the Hub answers as the stand-in does."""
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem
    from fsspec.registry import _registry

    root = tmp_path / "hub"

    class LocalHub(DirFileSystem):
        protocol = "hf"
        cachable = False

        def __init__(self, **storage_options):
            super().__init__(path=str(root), fs=LocalFileSystem(), **storage_options)

    monkeypatch.setitem(_registry, "hf", LocalHub)  # what register_implementation does
    data = root / "datasets" / "org" / "name" / "data"
    data.mkdir(parents=True)
    docs = [r["text"] for r in random_prose(2, ["the", "cat", "sat", "on", "a", "mat", "by", "the", "door"], 60)]
    for i in range(2):
        pq.write_table(pa.table({"text": docs[i::2]}), data / f"train-0000{i}.parquet")
    (data / "README.md").write_text("not in the glob")

    urls, hub = prepare_each_file("hf://datasets/org/name/data/*.parquet", tmp_path / "from_hf")
    assert urls == ["hf://datasets/org/name/data/train-00000.parquet",
                    "hf://datasets/org/name/data/train-00001.parquet"]
    _, on_disk = prepare_each_file(str(data / "*.parquet"), tmp_path / "from_disk")
    assert hub == on_disk and len(hub) >= 60
    assert {source for _, _, source in hub} == {"train"}


def test_the_resolved_config_is_printed_only_with_verbose(corpus_dir, tmp_path, ray_session, capsys, monkeypatch):
    from miniplm.cli import main

    monkeypatch.setenv("MINIPLM_VERBOSE", "0")  # restored after the test: main() sets it
    inputs = str(corpus_dir / "*.jsonl")
    assert main(["prepare", inputs, "--output", str(tmp_path / "quiet")]) == 0
    quiet = capsys.readouterr()
    assert main(["prepare", inputs, "--output", str(tmp_path / "loud"), "--verbose"]) == 0
    loud = capsys.readouterr()
    assert "PrepareConfig:" not in quiet.out + quiet.err and "PrepareConfig:" in loud.out
    assert f"  output: {tmp_path / 'loud'}" in loud.out
    # the one summary line (the bar, on stderr, cleared itself)
    (summary,) = quiet.out.strip().splitlines()
    assert summary.startswith("prepare: ") and f"-> {read_instances(tmp_path / 'quiet').num_rows} instances" in summary
