"""Storage shared by every stage: fsspec paths (local or s3://, gs://, ...), Parquet parts
that appear atomically, `_manifest.json` / `_job.json` records and fingerprints.

A stage's output folder holds numbered `part-*.parquet` files, a `_job.json` written when
the stage starts (what it was asked to do, so a re-run with other inputs refuses instead
of mixing) and a `_manifest.json` written last (counts, fingerprints; its presence means
the stage finished). Parts are written under `_tmp/` and moved into place, so a part file
with a final name is always complete. While a run works on a folder it holds its lease
(`_lease.json`, `miniplm.lease`); `--overwrite` empties only a folder the same stage made.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import uuid
from typing import Any, Iterable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from miniplm import hub
from miniplm.lease import LEASE, Lease

MANIFEST = "_manifest.json"
JOB = "_job.json"
TMP = "_tmp"
PART_GLOB = "part-*.parquet"


class StorageError(RuntimeError):
    """Writing an output failed (disk full, permission, read-only, bad bucket...)."""


@contextlib.contextmanager
def writing(url: str) -> Iterator[None]:
    """Turn an OS / object-store error while writing `url` into one clear message. Writes are
    atomic (see `write_bytes`), so a failed one leaves no file a re-run would take as done."""
    try:
        yield
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise StorageError(f"cannot write {url}: {reason}. Nothing half-written was kept: free "
                           "space or fix permissions, then re-run the same command to resume.") from err


def join(root: str, *names: str) -> str:
    """Join path segments for local paths and URLs alike."""
    return posixpath.join(root.rstrip("/"), *names)


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def is_local(url: str) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(url_to_fs(url)[0], LocalFileSystem)


def local_path(url: str) -> str:
    """The absolute local path of a local URL (`file://x`, `./x`); URLs elsewhere unchanged.
    Ray Train and other non-fsspec code need a plain path for local storage."""
    return os.path.abspath(url_to_fs(url)[1]) if is_local(url) else url


def list_parts(root: str) -> list[str]:
    """Finished part files in a stage folder, sorted by name, as URLs."""
    fs, path = url_to_fs(root)
    found = fs.glob(posixpath.join(path, PART_GLOB))
    return sorted(fs.unstrip_protocol(p) for p in found)


def arrow_filesystem(fs):
    """The pyarrow filesystem for an fsspec one (None for local disk: pyarrow's own is faster)."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


def read_json(url: str) -> Any:
    with fsspec.open(url, "r") as f:
        return json.load(f)


def write_json(url: str, obj: Any) -> None:
    """Write JSON so that a reader never sees half a file (tmp name, then move)."""
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=False).encode())


def write_bytes(url: str, data: bytes) -> None:
    """Write a file so it appears whole or not at all: into `_tmp/` next to it, then moved."""
    fs, path = url_to_fs(url)
    parent, name = posixpath.split(path)
    tmp = posixpath.join(parent, TMP, f"{name}.{uuid.uuid4().hex}")
    with writing(url):
        fs.makedirs(posixpath.dirname(tmp), exist_ok=True)
        try:
            if is_local(url):  # on disk before the rename publishes it: a crash leaves no empty part
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            else:
                with fs.open(tmp, "wb") as f:
                    f.write(data)
                fs.mv(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # the disk may still refuse; _tmp is cleared on re-run
                if fs.exists(tmp):
                    fs.rm(tmp)
            raise


# the Ray node that computed a part: where it was made, not what it is, so kept apart from the
# provenance (which is the same for every part of a table)
NODE_KEY = b"miniplm.node"


def write_parquet(url: str, table: pa.Table, metadata: dict | None = None, node: str | None = None) -> None:
    """Write one Parquet part atomically, provenance (and the node that computed the part) stored
    in the file's key-value metadata."""
    if metadata or node:
        meta = dict(table.schema.metadata or {})
        if metadata:
            meta[b"miniplm"] = json.dumps(metadata).encode()
        if node:
            meta[NODE_KEY] = node.encode()
        table = table.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(url, sink.getvalue().to_pybytes())


def read_part(url: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet part file of a stage's output (or some of its columns), local or remote."""
    with fsspec.open(url, "rb") as f:
        return pq.read_table(f, columns=columns)


def read_parquet_metadata(url: str) -> dict:
    """The `miniplm` provenance a part file was written with ({} when none)."""
    with fsspec.open(url, "rb") as f:
        return provenance_of(pq.read_schema(f))


def part_node(url: str) -> str | None:
    """The id of the Ray node that computed a part file (None when not recorded)."""
    with fsspec.open(url, "rb") as f:
        return node_of(pq.read_schema(f))


def node_of(schema: pa.Schema) -> str | None:
    meta = schema.metadata or {}
    return meta[NODE_KEY].decode() if NODE_KEY in meta else None


def provenance_of(schema: pa.Schema) -> dict:
    """The `miniplm` provenance in a Parquet schema's key-value metadata ({} when none)."""
    meta = schema.metadata or {}
    return json.loads(meta[b"miniplm"]) if b"miniplm" in meta else {}


def clear_tmp(root: str) -> None:
    """Drop leftovers of writes a killed run never finished."""
    fs, path = url_to_fs(root)
    tmp = posixpath.join(path, TMP)
    if fs.exists(tmp):
        fs.rm(tmp, recursive=True)


def write_manifest(root: str, manifest: dict) -> None:
    """Mark a stage's output finished: the manifest goes last, then write leftovers go."""
    write_json(join(root, MANIFEST), manifest)
    clear_tmp(root)


def cache_dir() -> str:
    return os.environ.get("MINIPLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "miniplm"))


def local_copy(url: str) -> str:
    """A local path holding `url` (a file or a folder): the path itself on local disk, else a
    download cached on this machine. The cache key covers every file's name, size and ETag,
    so a checkpoint rewritten in place downloads again. Safe when several workers of one node
    ask at once: each downloads into its own folder and the first rename wins."""
    fs, path = url_to_fs(url)
    if is_local(url):
        return hub.local_snapshot(path)  # a Hub snapshot this node's cache lacks: fetched here
    path = path.rstrip("/")
    files = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    if not files:
        raise FileNotFoundError(f"{url}: nothing there to download")
    listing = sorted((name, info.get("size"), str(_version_tag(info))) for name, info in files.items())
    target = os.path.join(cache_dir(), "remote", hash_json([url, listing]), posixpath.basename(path))
    if os.path.exists(target):
        return target
    clear_stale_partials(os.path.dirname(target))
    staging = f"{os.path.dirname(target)}.{uuid.uuid4().hex}.partial"
    root = os.path.join(staging, posixpath.basename(path))
    sources = sorted(files)  # a single file lands as `root`, a folder's files under it
    dests = [root if name == path else os.path.join(root, posixpath.relpath(name, path)) for name in sources]
    try:
        for dest in dests:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
        fs.get(sources, dests)  # one call: async stores (s3fs, gcsfs) fetch the shards concurrently
    except BaseException:  # a failed download leaves nothing behind in the cache
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        os.rename(staging, os.path.dirname(target))
    except OSError:  # another process finished first: theirs is identical
        shutil.rmtree(staging, ignore_errors=True)
    return target


STALE_PARTIAL_S = 24 * 3600  # older than any live download: left by a killed process


def clear_stale_partials(folder: str) -> None:
    """Remove the staging folders of downloads into `folder` that a killed process left."""
    import glob
    import time

    for stale in glob.glob(f"{glob.escape(folder)}.*.partial"):
        if time.time() - os.path.getmtime(stale) > STALE_PARTIAL_S:
            shutil.rmtree(stale, ignore_errors=True)


def _version_tag(info: dict):
    """What changes when an object is rewritten, in the spellings fsspec backends use."""
    for key in ("ETag", "etag", "md5Hash", "LastModified", "mtime", "updated", "created"):
        if info.get(key):
            return info[key]
    return ""


def upload_dir(local: str, url: str) -> None:
    """Copy a local folder's files to `url` (a local folder or an object-store prefix)."""
    fs, path = url_to_fs(url)
    fs.put(local.rstrip("/") + "/", path, recursive=True)  # trailing slash: the contents, not the folder


def remove_dir(root: str) -> None:
    fs, path = url_to_fs(root)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@contextlib.contextmanager
def claim_output(root: str, job: dict, *, overwrite: bool, what: str, inputs: Iterable[str] = (),
                 remedy: str = "Use another --output, or --overwrite to replace it.") -> Iterator[bool]:
    """Hold `root` as the output of `job` for the `with` block; yields True when it already
    holds this job's finished output. Refused before anything is written: an output that is,
    holds or sits inside one of `inputs`; a non-empty folder this stage did not make (with or
    without `overwrite`); a folder another live run holds. A folder this stage made with other
    settings is refused (saying `remedy`) unless `overwrite`, which empties it."""
    check_apart(root, inputs)
    check_made_by(root, job["stage"])  # before the lease: nothing is written into a foreign folder
    with hold(root, job["stage"]):
        check_made_by(root, job["stage"])  # again, held: another stage may have written it meanwhile
        yield _claim(root, job, overwrite=overwrite, what=what, remedy=remedy)


def hold(root: str, stage: str, wait: bool = False) -> Lease:
    """`root`'s lease for this run, taken (or waited for); use it in a `with` block. An output
    that cannot be written fails here with one clear message."""
    lease = Lease(root, stage)
    with writing(root):
        return lease.wait() if wait else lease.acquire()


def _claim(root: str, job: dict, *, overwrite: bool, what: str, remedy: str) -> bool:
    job_url, manifest_url = join(root, JOB), join(root, MANIFEST)
    if overwrite:
        remove_contents(root, keep=(LEASE,))
    elif exists(job_url):
        previous = read_json(job_url)
        if previous != job:
            diff = sorted(k for k in set(job) | set(previous) if job.get(k) != previous.get(k))
            raise ValueError(
                f"{root} already holds {what} made with different settings ({', '.join(diff)} "
                f"differ). {remedy}")
        return exists(manifest_url)
    write_json(job_url, job)
    return False


def check_made_by(root: str, stage: str, marker: str = JOB) -> None:
    """Refuse a non-empty folder that `stage` did not make (its `marker` file says who did)."""
    names = [n for n in list_names(root) if not n.startswith(LEASE) and n != TMP]  # (a heartbeat's tmp too)
    if not names:
        return
    if marker in names:
        made_by = read_json(join(root, marker)).get("stage", stage) if marker == JOB else stage
        if made_by == stage:
            return
        raise ValueError(f"{root} holds the output of `miniplm {made_by}`, not of `{stage}`: "
                         "use another output folder")
    shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
    raise ValueError(f"{root} is not empty and miniplm {stage} did not make it (it holds {shown}). "
                     "miniplm writes only into a new or empty folder, or one this stage made: "
                     "give another output folder")


def list_names(root: str) -> list[str]:
    """The names of the entries directly inside `root` ([] when it does not exist)."""
    fs, path = url_to_fs(root)
    if not fs.isdir(path):
        if fs.exists(path):
            raise ValueError(f"{root} is a file, not a folder")
        return []
    return [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]


def remove_contents(root: str, keep: tuple[str, ...] = ()) -> None:
    """Empty a folder this stage made, keeping the named entries (this run's lease)."""
    fs, path = url_to_fs(root)
    for name in list_names(root):
        if name not in keep:
            fs.rm(posixpath.join(path, name), recursive=True)


def check_apart(output: str, inputs: Iterable[str]) -> None:
    """Refuse an output that is an input, holds one or sits inside one: a stage never
    writes where it reads."""
    out = _location(output)
    for url in inputs:
        if not url:
            continue
        where = _location(url)
        if out[0] != where[0]:
            continue
        if out[1] == where[1]:
            relation = "is"
        elif where[1].startswith(out[1].rstrip("/") + "/"):
            relation = "contains"
        elif out[1].startswith(where[1].rstrip("/") + "/"):
            relation = "is inside"
        else:
            continue
        raise ValueError(f"output {output} {relation} the input {url}: a stage never writes where "
                         "it reads. Give an output folder apart from every input")


def _location(url: str) -> tuple[str, str]:
    """(filesystem, normalised path) of a local path or URL, for comparing places."""
    fs, path = url_to_fs(url)
    if is_local(url):
        return "file", os.path.realpath(path)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol, path.rstrip("/")


def plain_name(name: str, what: str) -> str:
    """`name` as one path segment: names read from configs and manifests never lead outside
    the folder they are joined to."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\x00"):
        raise ValueError(f"{what}: {name!r} is not a plain name (no path separators, no '..')")
    return name


def read_instances_manifest(root: str) -> dict:
    url = join(root, MANIFEST)
    if not exists(url):
        raise FileNotFoundError(f"{root}: no {MANIFEST}; is it an instances dataset written by "
                                "`miniplm prepare` or `miniplm select`?")
    manifest = read_json(url)
    if "fingerprint" not in manifest or "parts" not in manifest:
        raise ValueError(f"{url}: not an instances manifest (no fingerprint/parts)")
    return manifest


# ---------------------------------------------------------------- fingerprints


class RowSetHash:
    """Order-independent fingerprint of a multiset of rows: the sum of per-row 128-bit
    BLAKE2b digests mod 2**128. Parts hash in parallel and their sums combine exactly."""

    MOD = 1 << 128

    def __init__(self, total: int = 0, count: int = 0):
        self.total, self.count = total, count

    def add(self, *fields: str) -> None:
        data = "\x00".join(fields).encode("utf-8", "surrogatepass")
        digest = hashlib.blake2b(data, digest_size=16).digest()
        self.total = (self.total + int.from_bytes(digest, "little")) % self.MOD
        self.count += 1

    def merge(self, other: "RowSetHash") -> None:
        self.total = (self.total + other.total) % self.MOD
        self.count += other.count

    def hexdigest(self) -> str:
        return hashlib.sha256(f"{self.total:032x}:{self.count}".encode()).hexdigest()[:32]

    def state(self) -> dict:
        return {"sum": f"{self.total:032x}", "count": self.count}

    @classmethod
    def from_state(cls, state: dict) -> "RowSetHash":
        return cls(int(state["sum"], 16), int(state["count"]))


def hash_files(urls: Iterable[str], chunk: int = 1 << 22) -> str:
    """SHA-256 over the contents of files, in the given order (names not included, so a
    copied checkpoint keeps its fingerprint)."""
    h = hashlib.sha256()
    for url in urls:
        with fsspec.open(url, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()[:32]


def hash_files_cached(urls: list[str]) -> str:
    """`hash_files`, remembered on this machine by the files' identity (path, size and mtime,
    or the store's version tag): a no-op re-run does not read a multi-GB checkpoint again, and
    a file rewritten in place is read again."""
    identity = [(url, *file_identity(url)) for url in urls]
    memo = os.path.join(cache_dir(), "fingerprints", hash_json(identity))
    if os.path.exists(memo):
        with open(memo) as f:
            return f.read().strip()
    digest = hash_files(urls)
    os.makedirs(os.path.dirname(memo), exist_ok=True)
    tmp = f"{memo}.{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        f.write(digest)
    os.replace(tmp, memo)
    return digest


def file_identity(url: str) -> tuple:
    """(size, version) of a file, and its inode on disk: what a rewrite changes, unread."""
    if is_local(url):
        st = os.stat(local_path(url))
        return st.st_size, st.st_mtime_ns, st.st_ino
    fs, path = url_to_fs(url)
    info = fs.info(path)
    return info.get("size"), str(_version_tag(info))


def file_version(url: str) -> list:
    """A file's size and version (mtime on disk, the store's ETag elsewhere): what changes
    when the file is rewritten, without reading it."""
    return list(file_identity(url)[:2])


def seeded_hashes(keys: Iterable[str], seed: int) -> np.ndarray:
    """A 64-bit hash of `seed:key` per key, as uint64: a draw that depends on the key alone,
    never on its part or position (the D_ref split, random selection, Gumbel noise)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(f"{seed}:{k}".encode("utf-8", "surrogatepass"),
                                                       digest_size=8).digest(), "little") for k in keys),
                       dtype=np.uint64)


def hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]
