"""The built-in sample corpus: real text found on any machine where miniplm is installed,
gathered from the local Python installation without any download.

It has the quality mix Difference Sampling exists for:
  docs     installed packages' long descriptions (README prose)      - valuable prose
  code     standard-library modules, docstrings included               - valuable code
  license  license files shipped with packages                          - repetitive boilerplate
  noise    packages' RECORD files (paths and hashes)                    - noise
A slice of `docs` (packages chosen by a hash of their name) is held out as the evaluation set
and never used for training or selection. Deterministic for a given installation.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pathlib
import sysconfig

SHARE = {"docs": 0.40, "code": 0.35, "license": 0.15, "noise": 0.10}
FILES_PER_SOURCE = 4


def _rank(name: str) -> str:
    """A stable pseudo-random order (sorting by name would favour packages starting with 'a')."""
    return hashlib.sha256(name.encode()).hexdigest()


def _held_out(name: str, fraction: float) -> bool:
    return int(_rank("heldout:" + name)[:8], 16) / 16**8 < fraction


def _distributions() -> list[importlib.metadata.Distribution]:
    seen, dists = set(), []
    for dist in importlib.metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        if name and name not in seen:
            seen.add(name)
            dists.append(dist)
    return sorted(dists, key=lambda d: _rank(d.metadata["Name"].lower()))


def _description(dist) -> str:
    text = dist.metadata.get("Description") or ""
    payload = dist.metadata.get_payload() if hasattr(dist.metadata, "get_payload") else None
    return (payload or text or "").strip()


def gather(max_bytes: int, heldout_fraction: float) -> tuple[dict[str, list[str]], list[str]]:
    """(training documents per source, held-out documents)."""
    budget = {s: int(max_bytes * share) for s, share in SHARE.items()}
    docs: dict[str, list[str]] = {s: [] for s in SHARE}
    heldout: list[str] = []
    used = {s: 0 for s in SHARE}

    def take(source: str, text: str) -> None:
        if text.strip() and used[source] < budget[source]:
            docs[source].append(text)
            used[source] += len(text.encode())

    heldout_bytes, heldout_budget = 0, int(max_bytes * heldout_fraction)
    for dist in _distributions():
        name = dist.metadata["Name"].lower()
        text = _description(dist)
        if len(text) > 400:
            if _held_out(name, heldout_fraction * 2) and heldout_bytes < heldout_budget:
                heldout.append(text)
                heldout_bytes += len(text.encode())
            else:
                take("docs", text)
        for f in sorted(dist.files or [], key=str):
            if f.name.upper().startswith(("LICENSE", "LICENCE", "COPYING")):
                take("license", _read(dist.locate_file(f)))
            elif f.name == "RECORD":
                take("noise", _read(dist.locate_file(f)))
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py"), key=lambda p: _rank(p.name)):
        take("code", _read(path))
    return docs, heldout


def _read(path) -> str:
    try:
        return pathlib.Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def write_sample_corpus(out: str, *, max_bytes: int = 1_000_000, heldout_fraction: float = 0.1) -> dict:
    """Write `out/train/<source>-<k>.jsonl` and `out/heldout/docs.jsonl`; returns byte counts."""
    docs, heldout = gather(max_bytes, heldout_fraction)
    os.makedirs(os.path.join(out, "train"), exist_ok=True)
    os.makedirs(os.path.join(out, "heldout"), exist_ok=True)
    sizes = {}
    for source, texts in docs.items():
        for k in range(FILES_PER_SOURCE):
            shard = texts[k::FILES_PER_SOURCE]
            _write_jsonl(os.path.join(out, "train", f"{source}-{k}.jsonl"), shard)
        sizes[source] = sum(len(t.encode()) for t in texts)
    _write_jsonl(os.path.join(out, "heldout", "docs.jsonl"), heldout)
    sizes["heldout"] = sum(len(t.encode()) for t in heldout)
    return sizes


def _write_jsonl(path: str, texts: list[str]) -> None:
    with open(path, "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
