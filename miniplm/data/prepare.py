"""prepare: raw corpus files -> the instances dataset (`id, text, n_bytes, source`).

Reads .jsonl/.json, .parquet and .txt files (optionally .gz/.bz2/.xz/.zst compressed), local
or any fsspec URL, one Ray Data task per file. Long documents are split at paragraph, line or
word boundaries into instances of at most `max_chars` characters. An instance id is
`<file relative to the inputs' common folder>:<row>:<chunk>`, stable across re-runs and
machines. Files are read in blocks, so no file's size decides memory: a JSON line or array
record over `max_line_bytes` is skipped without being held, and a whole-file .txt document is
split as it streams. Bad rows are skipped and counted per reason (or, with `strict`, stop the
run naming file and line). Each input file writes its own numbered parts and then a completion
marker, so a killed run re-runs only unfinished files.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import itertools
import json
import posixpath
import re
import time
from typing import Iterable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.utils import infer_compression

from miniplm import __version__, console, io
from miniplm.cluster import check_paths_visible
from miniplm.config import describe, field, to_dict

COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
CODECS = {".zst": "zstandard"}  # the package fsspec needs for a compression outside the standard library
FORMATS = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
INSTANCE_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()),
                             ("n_bytes", pa.int64()), ("source", pa.string())])
DONE = "_done"


@dataclasses.dataclass(kw_only=True, frozen=True)
class PrepareConfig:
    inputs: list[str] = field(path=True, help="corpus files, folders or globs (local paths or fsspec URLs)",
                              flag="positional")
    output: str = field(path=True, help="folder for the instances dataset (local path or fsspec URL)")
    text_field: str = field("text", help="JSON field / Parquet column holding the text")
    lines: bool = field(False, help=".txt files hold one document per line (else one per file)")
    max_chars: int = field(8192, help="split documents longer than this many characters")
    max_line_bytes: int = field(8_000_000, help="skip (counted as too_long) a JSON line, JSON array "
                                "record or --lines text line longer than this many bytes, without "
                                "ever holding it whole; a whole-file .txt document is streamed "
                                "and split instead")
    source: str | None = field(None, help="`source` label for every instance (default: the file "
                                          "stem without a shard number)")
    strict: bool = field(False, help="stop at the first bad row, naming file and line")
    rows_per_part: int = field(10_000, help="instances per Parquet part (the unit of scoring and resume)")
    overwrite: bool = field(False, help="replace an output folder made with other settings")

    def __post_init__(self):
        if not self.inputs:
            raise ValueError("inputs: give at least one corpus file, folder or glob")
        if self.max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {self.max_chars}")
        if self.max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be >= 1, got {self.max_line_bytes}")
        if self.rows_per_part < 1:
            raise ValueError(f"rows_per_part must be >= 1, got {self.rows_per_part}")


class BadRecord(ValueError):
    """A row that `strict` mode refuses; the message names file and line."""


# ---------------------------------------------------------------- finding files


def file_format(path: str) -> str:
    name = posixpath.basename(path).lower()
    for ext in COMPRESSIONS:
        name = name.removesuffix(ext)
    for ext, fmt in FORMATS.items():
        if name.endswith(ext):
            return fmt
    raise ValueError(f"{path}: unknown corpus format; expected one of "
                     f"{', '.join(FORMATS)} (optionally {', '.join(COMPRESSIONS)})")


def file_stem(path: str) -> str:
    """The default `source` label: the file name without extensions or a trailing shard
    number (`pile_cc-00012.jsonl.gz` -> `pile_cc`), else the folder (`wiki/00.jsonl` -> `wiki`)."""
    name = posixpath.basename(path)
    for ext in COMPRESSIONS + tuple(FORMATS):
        name = name.removesuffix(ext)
    label = re.sub(r"[-_.]?\d+$", "", name)
    return label or posixpath.basename(posixpath.dirname(path)) or name


def expand_inputs(patterns: list[str]) -> list[str]:
    """Corpus files (as URLs) behind files, folders and globs, sorted, each format-checked."""
    urls: list[str] = []
    for pattern in patterns:
        fs, path = url_to_fs(pattern)
        if any(c in path for c in "*?["):
            found = fs.glob(path)
        elif fs.isdir(path):
            found = [p for p in fs.find(path) if _is_corpus_file(p)]
        elif fs.exists(path):
            found = [path]
        else:
            raise FileNotFoundError(f"{pattern}: no such file or folder")
        if not found:
            raise FileNotFoundError(f"{pattern}: matched no corpus files")
        urls += [fs.unstrip_protocol(p) for p in found]
    urls = sorted(set(urls))
    for url in urls:
        file_format(url)
        check_codec(url)
    return urls


def check_codec(url: str) -> None:
    """Refuse a compressed file fsspec cannot decompress here: opened with
    `compression="infer"`, it would be read as its compressed bytes, every row a bad one."""
    ext = posixpath.splitext(url)[1].lower()
    if ext in COMPRESSIONS and infer_compression(url) is None:
        hint = f"; pip install {CODECS[ext]}" if ext in CODECS else ""
        raise ValueError(f"{url}: fsspec cannot decompress {ext} files in this environment{hint}")


def _is_corpus_file(path: str) -> bool:
    try:
        return not posixpath.basename(path).startswith((".", "_")) and bool(file_format(path))
    except ValueError:
        return False


def relative_names(urls: list[str]) -> list[str]:
    """Each file's path relative to the deepest folder holding all of them: the stable
    first part of an instance id (the same corpus on local disk or in a bucket)."""
    paths = [url_to_fs(u)[1] for u in urls]
    root = posixpath.commonpath([posixpath.dirname(p) for p in paths]) if paths else ""
    return [posixpath.relpath(p, root) if root else p for p in paths]


# ---------------------------------------------------------------- reading rows

# A reader's row: (row, text, skip_reason). The text is a str, or for a whole .txt file an
# iterable of str blocks, so that no file is ever held whole.
Row = tuple[int, "str | Iterable[str] | None", "str | None"]
READ_BLOCK = 1 << 20  # bytes per read: all a reader holds besides the record it is building
_SURROGATE = re.compile("[\ud800-\udfff]")


def _blocks(f) -> Iterator[bytes]:
    return iter(lambda: f.read(READ_BLOCK), b"")


def _decode(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _check_text(value: object) -> tuple[str | None, str | None]:
    """(text, None) for a usable value, else (None, reason)."""
    if value is None:
        return None, "null_text"
    if not isinstance(value, str):
        return None, "non_string_text"
    if not value.strip():
        return None, "empty_text"
    if _SURROGATE.search(value):  # a lone `\ud800` escape in JSON: no UTF-8 exists for it
        return None, "invalid_unicode"
    return value, None


def read_lines(f, limit: int) -> Iterator[tuple[bytes | None, str | None]]:
    """(line, None) for each line of a binary stream, without its b"\\n", or (None, "too_long")
    for a line over `limit` bytes, dropped as it is read: never more than `limit` plus a block
    is held (a plain readline would hold the whole line)."""
    line, size, too_long = [], 0, False
    for data in _blocks(f):
        start = 0
        while True:
            end = data.find(b"\n", start)
            stop = len(data) if end < 0 else end
            size += stop - start
            too_long = too_long or size > limit
            if too_long:
                line = []
            elif end >= 0 and not line:  # the whole line is in this block: no copy to join
                yield data[start:end], None
            elif stop > start:
                line.append(data[start:stop])
            if end < 0:
                break
            if too_long or line:
                yield (None, "too_long") if too_long else (b"".join(line), None)
            line, size, too_long, start = [], 0, False, end + 1
    if too_long or line:  # a last line without b"\n"
        yield (None, "too_long") if too_long else (b"".join(line), None)


class JsonArrayRecords:
    """Splits a JSON array into its records' raw bytes by tracking strings and nesting, so that
    each record is parsed alone, as a JSON line is: a bad record is counted by itself, one over
    `limit` bytes is dropped as it is read, and an array cut off by the end of the file keeps
    the records before the cut. (ijson would parse whole records too, but it turns a lone
    surrogate into "?" unsaid, and its prefixes take memory quadratic in the nesting depth.)"""

    TOKEN = re.compile(rb'["\[\]{},]')  # what matters outside a string
    STRING_END = re.compile(rb'\\*"')  # a quote and the backslashes before it

    def __init__(self, limit: int):
        self.limit = limit
        self.depth = 0  # nesting inside the current record
        self.in_string = False
        self.escaped = False  # a block ended inside a string on an odd run of backslashes
        self.record: list[bytes] | None = []  # None once the record is over the limit
        self.size = 0
        self.end = 0  # offset just past the array's closing b"]" in its block

    def __call__(self, f) -> Iterator[tuple[bytes | None, str | None]]:
        started = False
        for data in _blocks(f):
            start = 0
            if not started:  # the caller saw that the first non-blank byte is b"["
                start = data.find(b"[") + 1
                started = start > 0
                if not started:
                    continue
            if (yield from self._scan(data, start)):
                if data[self.end:].strip() or any(b.strip() for b in _blocks(f)):
                    yield None, "invalid_json"  # something after the array: not JSON
                return
        yield None, "truncated_json"

    def _scan(self, data: bytes, i: int):
        """Yield the records that end in `data` (from offset i); return True at the array's end."""
        start = i  # where the current record's bytes in this block begin
        while i < len(data):
            if self.in_string:
                i = self._skip_string(data, i)
                continue
            m = self.TOKEN.search(data, i)
            if m is None:
                break
            c, i = data[m.start()], m.end()
            if c == ord('"'):
                self.in_string = True
            elif c in b"[{":
                self.depth += 1
            elif self.depth:  # inside a record: only nesting matters
                if c != ord(","):
                    self.depth -= 1
            elif c in b",]":  # the end of a record
                self._add(data, start, m.start())
                yield self._take()
                start = i
                if c == ord("]"):
                    self.end = i
                    return True
        self._add(data, start, len(data))
        return False

    def _skip_string(self, data: bytes, i: int) -> int:
        if self.escaped:
            self.escaped = False
            return i + 1
        m = self.STRING_END.search(data, i)
        if m is None:
            j = len(data)
            while j > i and data[j - 1] == ord("\\"):
                j -= 1
            self.escaped = (len(data) - j) % 2 == 1
            return len(data)
        self.in_string = (m.end() - m.start()) % 2 == 0  # an odd run of backslashes escapes it
        return m.end()

    def _add(self, data: bytes, start: int, end: int) -> None:
        if self.record is None:
            return
        self.size += end - start
        if self.size > self.limit:
            self.record = None
        else:
            self.record.append(data[start:end])

    def _take(self) -> tuple[bytes | None, str | None]:
        record, self.record, self.size = self.record, [], 0
        return (None, "too_long") if record is None else (b"".join(record), None)


def read_json_rows(url: str, text_field: str, max_line_bytes: int) -> Iterator[Row]:
    with fsspec.open(url, "rb", compression="infer") as f:
        head = f.read(1 << 16)
        is_array = head.lstrip()[:1] == b"["  # a .json file holding one array of records
        f.seek(0)
        records = JsonArrayRecords(max_line_bytes)(f) if is_array else read_lines(f, max_line_bytes)
        for row, (raw, reason) in enumerate(records):
            if reason:
                yield row, None, reason
            elif raw.strip():  # blank lines separate nothing in JSON Lines; not a record
                yield row, *_parse_json_record(raw, text_field)


def _parse_json_record(raw: bytes, text_field: str) -> tuple[str | None, str | None]:
    line = _decode(raw)
    if line is None:
        return None, "invalid_utf8"
    try:
        rec = json.loads(line)
    except RecursionError:
        return None, "too_deep"
    except ValueError:  # JSONDecodeError, or an integer past sys.get_int_max_str_digits()
        return None, "invalid_json"
    if not isinstance(rec, dict) or text_field not in rec:
        return None, "missing_text"
    return _check_text(rec[text_field])


def read_parquet_rows(url: str, text_field: str) -> Iterator[Row]:
    with fsspec.open(url, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if text_field not in names:
            raise ValueError(f"{url}: no column {text_field!r} (columns: {', '.join(names)}); "
                             "pass --text-field")
        kind = pf.schema_arrow.field(text_field).type
        is_binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
        if not (is_binary or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise ValueError(f"{url}: column {text_field!r} has type {kind}, not text")
        row = 0
        for batch in pf.iter_batches(columns=[text_field], batch_size=8192):
            for value in batch.column(0).to_pylist():
                if is_binary and value is not None:
                    value = _decode(value)
                    if value is None:
                        yield row, None, "invalid_utf8"
                        row += 1
                        continue
                yield row, *_check_text(value)
                row += 1


def read_text_rows(url: str, cfg: PrepareConfig) -> Iterator[Row]:
    if not cfg.lines:
        yield from read_text_document(url)
        return
    with fsspec.open(url, "rb", compression="infer") as f:
        for row, (raw, reason) in enumerate(read_lines(f, cfg.max_line_bytes)):
            line = None if reason else _decode(raw.rstrip(b"\r\n"))
            if reason or line is None:
                yield row, None, reason or "invalid_utf8"
            elif line.strip():  # blank lines are spacing, not documents
                yield row, line, None


def read_text_document(url: str) -> Iterator[Row]:
    """A whole .txt file as one document. A file of one block is read at once; a longer one
    is read twice, in blocks: first to check it is UTF-8 holding some text (a document is
    kept or skipped whole, so this is known before its first chunk), then for its text."""
    with fsspec.open(url, "rb", compression="infer") as f:
        head, more = f.read(READ_BLOCK), f.read(READ_BLOCK)
        if not more:
            text = _decode(head)
            yield (0, None, "invalid_utf8") if text is None else (0, *_check_text(text))
            return
        reason = _text_problem(itertools.chain([head, more], _blocks(f)))
    yield (0, None, reason) if reason else (0, _text_blocks(url), None)


def _text_problem(blocks: Iterable[bytes]) -> str | None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    has_text = False
    try:
        for block in blocks:
            text = decoder.decode(block)  # every block: a bad byte may come after the text
            has_text = has_text or bool(text.strip())
        decoder.decode(b"", final=True)  # a character cut off by the end of the file
    except UnicodeDecodeError:
        return "invalid_utf8"
    return None if has_text else "empty_text"


def _text_blocks(url: str) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")()  # keeps a character cut across blocks
    with fsspec.open(url, "rb", compression="infer") as f:
        for block in _blocks(f):
            yield decoder.decode(block)
    yield decoder.decode(b"", final=True)


def read_rows(url: str, cfg: PrepareConfig) -> Iterator[Row]:
    """(row, text, skip_reason) for every record of one corpus file."""
    fmt = file_format(url)
    if fmt == "json":
        return read_json_rows(url, cfg.text_field, cfg.max_line_bytes)
    if fmt == "parquet":
        return read_parquet_rows(url, cfg.text_field)
    return read_text_rows(url, cfg)


# ---------------------------------------------------------------- chunking


def split_text(text: str, max_chars: int) -> list[str]:
    """Split into pieces of at most `max_chars`, cutting after the last paragraph break,
    else line break, else space in the second half of the window (else hard). Lossless:
    the pieces concatenate to the text; whitespace-only pieces are dropped."""
    pieces, rest = _cut(text, max_chars)
    pieces.append(text[rest:])
    return [p for p in pieces if p.strip()]


def split_stream(blocks: Iterable[str], max_chars: int) -> Iterator[str]:
    """split_text's pieces of the text that `blocks` concatenate to, holding at most
    `max_chars` plus one block: a cut depends only on the `max_chars` characters after it."""
    text = ""
    for block in blocks:
        text += block
        pieces, rest = _cut(text, max_chars)
        yield from (p for p in pieces if p.strip())
        text = text[rest:]
    if text.strip():
        yield text


def _cut(text: str, max_chars: int) -> tuple[list[str], int]:
    """The pieces cut off the front of `text` while more than `max_chars` remain, and where
    the rest starts. Searching by offset, never slicing off the rest, keeps it linear."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        end, cut = start + max_chars, 0
        for sep in ("\n\n", "\n", " ", "\t"):
            pos = text.rfind(sep, start, end)
            if pos >= 0 and pos - start + len(sep) > max_chars // 2:
                cut = pos - start + len(sep)
                break
        cut = cut or max_chars
        pieces.append(text[start:start + cut])
        start += cut
    return pieces, start


# ---------------------------------------------------------------- one file


class PartWriter:
    """Buffers instances of one input file and writes `part-<file>-<k>.parquet` parts."""

    def __init__(self, output: str, file_index: int, rows_per_part: int):
        self.output, self.file_index, self.rows_per_part = output, file_index, rows_per_part
        self.rows: dict[str, list] = {name: [] for name in INSTANCE_SCHEMA.names}
        self.parts: list[dict] = []
        self.hash = io.RowSetHash()

    def add(self, id_: str, text: str, source: str) -> None:
        self.rows["id"].append(id_)
        self.rows["text"].append(text)
        self.rows["n_bytes"].append(len(text.encode("utf-8", "surrogatepass")))
        self.rows["source"].append(source)
        self.hash.add(id_, text)
        if len(self.rows["id"]) >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        n = len(self.rows["id"])
        if not n:
            return
        name = f"part-{self.file_index:05d}-{len(self.parts):05d}.parquet"
        table = pa.Table.from_pydict(self.rows, schema=INSTANCE_SCHEMA)
        io.write_parquet(io.join(self.output, name), table)
        self.parts.append({"name": name, "rows": n, "bytes": sum(self.rows["n_bytes"])})
        self.rows = {k: [] for k in self.rows}


def prepare_file(url: str, rel_name: str, file_index: int, cfg: PrepareConfig) -> dict:
    """Turn one corpus file into instance parts; returns its stats (also its done-marker)."""
    source = cfg.source or file_stem(url)
    writer = PartWriter(cfg.output, file_index, cfg.rows_per_part)
    skipped: collections.Counter = collections.Counter()
    documents = 0
    for row, text, reason in read_rows(url, cfg):
        if reason:
            if cfg.strict:
                raise BadRecord(f"{url}, line {row + 1}: {reason.replace('_', ' ')}")
            skipped[reason] += 1
            continue
        documents += 1
        pieces = (split_text(text, cfg.max_chars) if isinstance(text, str)
                  else split_stream(text, cfg.max_chars))
        for k, chunk in enumerate(pieces):
            writer.add(f"{rel_name}:{row}:{k}", chunk, source)
    writer.flush()
    stats = {"file": url, "file_index": file_index, "source": source, "documents": documents,
             "instances": writer.hash.count, "skipped": dict(skipped), "parts": writer.parts,
             "hash": writer.hash.state()}
    io.write_json(io.join(cfg.output, DONE, f"{file_index:05d}.json"), stats)
    return stats


def _prepare_files(batch: dict, cfg: PrepareConfig) -> dict:
    """Ray Data map_batches function (CPU tasks): one corpus file per row."""
    stats = [prepare_file(str(u), str(r), int(i), cfg)
             for u, r, i in zip(batch["url"], batch["rel_name"], batch["file_index"])]
    return {"stats": [json.dumps(s) for s in stats]}


# ---------------------------------------------------------------- the stage


def run_prepare(cfg: PrepareConfig) -> dict:
    """Run the prepare stage; returns its manifest."""
    console.detail(describe(cfg))
    started = time.time()
    urls = expand_inputs(cfg.inputs)
    inputs = [p for p in cfg.inputs if not any(c in p for c in "*?[")] + urls
    with io.claim_output(cfg.output, job_record(cfg, urls), overwrite=cfg.overwrite,
                         what="an instances dataset", inputs=inputs) as finished:
        if finished:
            manifest = io.read_json(io.join(cfg.output, io.MANIFEST))
            print(f"prepare: {cfg.output} is already complete ({manifest['instances']} instances); "
                  "nothing to do")
            return manifest
        return _prepare_files_into(cfg, urls, started)


def _prepare_files_into(cfg: PrepareConfig, urls: list[str], started: float) -> dict:
    import ray

    from miniplm.runtime import init_ray, waiting_for

    io.clear_tmp(cfg.output)
    done = _finished_files(cfg.output)
    todo = [{"url": u, "rel_name": r, "file_index": i}
            for i, (u, r) in enumerate(zip(urls, relative_names(urls))) if i not in done]
    if done:
        print(f"prepare: resuming, {len(done)} of {len(urls)} files already done")
    if todo:
        init_ray()
        # on several nodes: every one must see the local files its tasks read (a few are
        # enough: a node that cannot see the corpus's folder sees none of them) and the output
        check_paths_visible({f"inputs ({u})": u for u in urls[:16]}, {"--output": cfg.output})
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        ds = ds.map_batches(_prepare_files, fn_kwargs={"cfg": cfg}, batch_size=1,
                            compute=ray.data.TaskPoolStrategy(), num_cpus=1)
        bar = console.progress(len(todo), desc="prepare", unit="file", waiting_for=waiting_for)
        for row in ds.iter_rows():
            stats = json.loads(row["stats"])
            done[stats["file_index"]] = stats
            bar.update(1)
            bar.set_postfix(instances=sum(s["instances"] for s in done.values()))
        bar.close()

    manifest = _manifest(cfg, urls, done, time.time() - started)
    io.write_manifest(cfg.output, manifest)
    print(summary(manifest), flush=True)
    return manifest


def job_record(cfg: PrepareConfig, urls: list[str]) -> dict:
    """What a prepare output is made of: a re-run must match it to resume. Each file enters
    with its size and version (mtime, or the store's ETag), so an input changed since is
    noticed instead of reported complete."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("output", "overwrite", "inputs")}
    return {"stage": "prepare", "files": urls, "versions": [io.file_version(u) for u in urls], **settings}


def _finished_files(output: str) -> dict[int, dict]:
    fs, path = url_to_fs(io.join(output, DONE))
    if not fs.exists(path):
        return {}
    stats = [io.read_json(fs.unstrip_protocol(p)) for p in fs.glob(posixpath.join(path, "*.json"))]
    return {s["file_index"]: s for s in stats}


def _manifest(cfg: PrepareConfig, urls: list[str], done: dict[int, dict], seconds: float) -> dict:
    fingerprint = io.RowSetHash()
    skipped: collections.Counter = collections.Counter()
    sources: collections.Counter = collections.Counter()
    parts = []
    for i in sorted(done):
        s = done[i]
        fingerprint.merge(io.RowSetHash.from_state(s["hash"]))
        skipped.update(s["skipped"])
        sources[s["source"]] += s["instances"]
        parts += s["parts"]
    return {
        "stage": "prepare",
        "version": __version__,
        "config": to_dict(cfg),
        "files": len(urls),
        "documents": sum(s["documents"] for s in done.values()),
        "instances": fingerprint.count,
        "bytes": sum(p["bytes"] for p in parts),
        "skipped": dict(sorted(skipped.items())),
        "sources": dict(sorted(sources.items())),
        "fingerprint": fingerprint.hexdigest(),
        "parts": parts,
        "seconds": round(seconds, 2),
    }


def summary(manifest: dict) -> str:
    skipped = manifest["skipped"]
    lines = [f"prepare: {manifest['files']} files, {manifest['documents']} documents -> "
             f"{manifest['instances']} instances ({manifest['bytes'] / 1e6:.1f} MB) in "
             f"{len(manifest['parts'])} parts, fingerprint {manifest['fingerprint']}"]
    if skipped:
        lines.append(f"  skipped {sum(skipped.values())} bad rows: "
                     + ", ".join(f"{k}={v}" for k, v in skipped.items()))
    return "\n".join(lines)
