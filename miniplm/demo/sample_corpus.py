"""The built-in sample corpus: real text found on every machine where miniplm is installed,
gathered without any download from exactly two places, so that two machines with the same
Python and the same resolved base dependencies get the same corpus:

  - the Python standard library (its top-level modules), and
  - the distributions that `pip install miniplm` always brings in: miniplm's base requirements
    and theirs, recursively (never optional extras, never whatever else is installed).

It has the quality mix Difference Sampling exists for:
  docs     those packages' long descriptions (README prose)         - valuable prose
  code     standard-library modules, docstrings included              - valuable code
  license  license files shipped with those packages                  - repetitive boilerplate
  noise    their RECORD files (installed paths and hashes)            - noise
A slice of `docs` (packages chosen by a hash of their name) is held out as the evaluation set
and never used for training or selection. Every text is kept once: a copy of a text already
taken (the same words once copyright lines, case and whitespace are set aside: most packages
ship the same MIT or Apache license) is dropped and counted, as a pre-training pipeline
deduplicates before it scores. Otherwise a twin of a pool document sits in D_ref, and a teacher
that memorised it there rewards the copy for being memorised, not for being worth learning.
`_manifest.json` records the Python version, the packages and versions the text came from, the
copies dropped, and a fingerprint of the text itself.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import sysconfig

from miniplm import io

SHARE = {"docs": 0.40, "code": 0.35, "license": 0.15, "noise": 0.10}
FILES_PER_SOURCE = 4
HELDOUT_FRACTION = 0.1  # of max_bytes, as held-out documents
ROOT_DISTRIBUTION = "miniplm"


def _rank(name: str) -> str:
    """A stable pseudo-random order (sorting by name would favour packages starting with 'a')."""
    return hashlib.sha256(name.encode()).hexdigest()


def _held_out(name: str, fraction: float) -> bool:
    return int(_rank("heldout:" + name)[:8], 16) / 16**8 < fraction


def _canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


def base_distributions(root: str = ROOT_DISTRIBUTION) -> list[importlib.metadata.Distribution]:
    """The installed distributions that `pip install <root>` brings in, without optional extras:
    root's base requirements (with the extras they name, e.g. ray[data,train]) and, recursively,
    theirs. The root itself is left out (its README changes with every release)."""
    from packaging.requirements import Requirement

    try:
        importlib.metadata.distribution(root)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"the sample corpus needs {root} installed (pip install -e .)") from None
    wanted: dict[str, set[str]] = {}
    stack: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    found: dict[str, importlib.metadata.Distribution] = {}
    while stack:
        name, extras = stack.pop()
        key = _canonical(name)
        if key in wanted and extras <= wanted[key]:
            continue
        wanted.setdefault(key, set()).update(extras)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a requirement whose marker excluded it at install time
        found[key] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in (sorted(wanted[key]) or [""])]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                stack.append((req.name, frozenset(req.extras)))
    found.pop(_canonical(root), None)
    return sorted(found.values(), key=lambda d: _rank(_canonical(d.metadata["Name"])))


def _description(dist) -> str:
    text = dist.metadata.get("Description") or ""
    payload = dist.metadata.get_payload() if hasattr(dist.metadata, "get_payload") else None
    return (payload or text or "").strip()


def stdlib_modules() -> list[pathlib.Path]:
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return sorted(stdlib.glob("*.py"), key=lambda p: _rank(p.name))


def _copy_key(text: str) -> str:
    """Texts with the same key are copies: the same words, apart from copyright lines (the
    holder and year of a standard license), case and whitespace."""
    words = re.sub(r"(?im)^.*copyright.*$", "", text)
    return hashlib.sha256(" ".join(words.lower().split()).encode()).hexdigest()


def gather(max_bytes: int, heldout_fraction: float
           ) -> tuple[dict[str, list[str]], list[str], list[str], dict[str, int]]:
    """(training documents per source, held-out documents, `name==version` of every package
    used, copies dropped per source)."""
    budget = {s: int(max_bytes * share) for s, share in SHARE.items()}
    docs: dict[str, list[str]] = {s: [] for s in SHARE}
    heldout: list[str] = []
    used = {s: 0 for s in SHARE}
    seen: set[str] = set()
    copies = {s: 0 for s in SHARE}

    def take(source: str, text: str) -> None:
        if not text.strip() or used[source] >= budget[source]:
            return
        key = _copy_key(text)
        if key in seen:
            copies[source] += 1
            return
        seen.add(key)
        docs[source].append(text)
        used[source] += len(text.encode())

    heldout_bytes, heldout_budget = 0, int(max_bytes * heldout_fraction)
    packages = []
    for dist in base_distributions():
        name = _canonical(dist.metadata["Name"])
        packages.append(f"{name}=={dist.version}")
        text = _description(dist)
        if len(text) > 400:
            if _held_out(name, heldout_fraction * 2) and heldout_bytes < heldout_budget:
                heldout.append(text)
                heldout_bytes += len(text.encode())
                seen.add(_copy_key(text))  # never a copy of the held-out set in training
            else:
                take("docs", text)
        for f in sorted(dist.files or [], key=str):
            if f.name.upper().startswith(("LICENSE", "LICENCE", "COPYING")):
                take("license", _read(dist.locate_file(f)))
            elif f.name == "RECORD":
                take("noise", _inside_site_packages(_read(dist.locate_file(f))))
    for path in stdlib_modules():
        take("code", _read(path))
    return docs, heldout, sorted(packages), copies


def _inside_site_packages(record: str) -> str:
    """A RECORD file without its entries for files installed outside site-packages (console
    scripts: their shebang, hence their hash, holds the venv's path), so the text does not
    depend on where the environment lives."""
    return "".join(line for line in record.splitlines(keepends=True) if not line.startswith("../"))


def _read(path) -> str:
    try:
        return pathlib.Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def write_sample_corpus(out: str, *, max_bytes: int = 1_000_000,
                        heldout_fraction: float = HELDOUT_FRACTION) -> dict:
    """Write `out/train/<source>-<k>.jsonl`, `out/heldout/docs.jsonl` and `out/_manifest.json`
    (byte counts, Python version, packages, and the fingerprint of the text); returns the manifest."""
    docs, heldout, packages, copies = gather(max_bytes, heldout_fraction)
    os.makedirs(os.path.join(out, "train"), exist_ok=True)
    os.makedirs(os.path.join(out, "heldout"), exist_ok=True)
    digest = hashlib.sha256()
    sizes = {}
    for source, texts in docs.items():
        for k in range(FILES_PER_SOURCE):
            _write_jsonl(os.path.join(out, "train", f"{source}-{k}.jsonl"), texts[k::FILES_PER_SOURCE], digest)
        sizes[source] = sum(len(t.encode()) for t in texts)
    _write_jsonl(os.path.join(out, "heldout", "docs.jsonl"), heldout, digest)
    sizes["heldout"] = sum(len(t.encode()) for t in heldout)
    manifest = {"fingerprint": digest.hexdigest()[:16], "python": platform.python_version(), "max_bytes": max_bytes,
                "bytes": sizes, "copies_dropped": copies, "packages": packages}
    io.write_manifest(out, manifest)  # last, whole or not at all: its presence means the corpus is complete
    print(f"sample corpus: {sum(sizes.values()):,} bytes from the Python {manifest['python']} standard "
          f"library and {len(packages)} base packages ({sum(copies.values())} copies of a text dropped: "
          f"{', '.join(f'{n} {s}' for s, n in copies.items() if n)}), fingerprint {manifest['fingerprint']}")
    return manifest


def _write_jsonl(path: str, texts: list[str], digest) -> None:
    data = "".join(json.dumps({"text": text}) + "\n" for text in texts).encode()
    digest.update(data)
    with open(path, "wb") as f:
        f.write(data)
