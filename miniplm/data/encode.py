"""Texts to token ids inside Ray tasks, without importing transformers.

`from transformers import AutoTokenizer` imports torch as well: about 5 s of CPU in every new
worker process, many times the tokenising a small part needs, and paid again whenever Ray
replaces an idle worker. A fast HF tokenizer encodes with its Rust backend (`tokenizers`), so
the driver loads the tokenizer once and hands tasks that backend, serialised; the tasks encode
with it exactly as the HF tokenizer does. A slow (Python) tokenizer has no such backend and is
loaded by path in the task.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pyarrow as pa

from miniplm import io
from miniplm.models import load_tokenizer


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """What a task needs of a tokenizer: its ids for texts, without special tokens, and the
    ids of the BOS/EOS tokens that frame a document."""
    path: str
    bos_token_id: int | None
    eos_token_id: int | None
    trust_remote_code: bool = False
    backend: str | None = None  # the fast tokenizer's `tokenizers` JSON; None: load by path
    split_special_tokens: bool = False  # the HF tokenizer's setting, which the backend must mirror

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self.backend is None:
            return load_tokenizer(self.path, self.trust_remote_code)(texts, add_special_tokens=False)["input_ids"]
        backend = _rust_tokenizer(self.backend, self.split_special_tokens)
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def text_encoder(path: str, trust_remote_code: bool = False) -> TextEncoder:
    """The encoder of the tokenizer at `path`, loaded here (in the driver) once."""
    tok = load_tokenizer(path, trust_remote_code)
    backend = tok.backend_tokenizer.to_str() if getattr(tok, "is_fast", False) else None
    return TextEncoder(path=path, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       trust_remote_code=trust_remote_code, backend=backend,
                       split_special_tokens=bool(getattr(tok, "split_special_tokens", False)))


@functools.lru_cache(maxsize=4)
def _rust_tokenizer(serialised: str, split_special_tokens: bool):
    """Parsed once per worker process (Ray reuses workers across tasks)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(serialised)
    tok.no_truncation()  # the HF tokenizer turns both off before it encodes: we window ourselves
    tok.no_padding()
    tok.encode_special_tokens = split_special_tokens
    return tok


def tokenize_part(batch: dict, encoder: TextEncoder) -> pa.Table:
    """The score stage's CPU task: one instances part -> one row holding all its ids and token ids.

    A whole part travels as one row so the actor scores it in one call, with micro-batches
    that depend only on the part: a resumed run reproduces a clean run's floats exactly."""
    rows = []
    for part, url in zip(batch["part"], batch["url"]):
        table = io.read_part(str(url), ["id", "text"])
        ids = encoder.encode(table["text"].to_pylist())
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
        rows.append({"part": str(part), "id": table["id"].combine_chunks(),
                     "input_ids": pa.LargeListArray.from_arrays(offsets, flat),
                     "n_tokens": pa.array(lengths)})
    return pa.Table.from_pydict({
        "part": [r["part"] for r in rows],
        "id": _list_of(r["id"] for r in rows),
        "input_ids": _list_of(r["input_ids"] for r in rows),
        "n_tokens": _list_of(r["n_tokens"] for r in rows),
    })


def _list_of(arrays) -> pa.Array:
    """A list<...> column whose i-th value is the i-th array."""
    arrays = list(arrays)
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int64)
    return pa.LargeListArray.from_arrays(offsets, pa.concat_arrays(arrays))
