"""Evaluation sets a selection cannot win by shifting sources, and bits per byte on them.

A refined corpus leans toward some sources (the demo's keeps more `docs`), so a held-out set of
one source can reward the shift instead of better data. The sets here:

  heldout         the run's own held-out split (the sample corpus: package READMEs, `docs`)
  <source>        one slice per source a student should learn (`docs`, `code`, `license`), drawn
                  from D_ref: a random half of the corpus that no student trains on
  outside-prose   real English prose from none of the corpus's sources: the Python Language
                  Reference as `pydoc_data.topics` ships it with every CPython (PSF License 2.0)

Every set is decontaminated against the text students train on (the pool): a document with half
or more of its word 13-grams in that text is a near-duplicate and is dropped (the overlap test
GPT-3 used, with a threshold, since standard licenses share whole phrases); the count is kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re

import numpy as np

from miniplm import io

NGRAM = 13
NEAR_DUPLICATE = 0.5    # share of a document's 13-grams found in training text
SOURCES = ("docs", "code", "license")  # `noise` (install records) is not something to learn
OUTSIDE = "outside-prose"
EVAL_BYTES = 100_000   # per set: ~30k tokens, seconds to score with a tiny model on CPU


@dataclasses.dataclass(frozen=True)
class EvalSet:
    name: str
    texts: list[str]
    dropped: int          # near-duplicates of training text removed
    origin: str

    @property
    def bytes(self) -> int:
        return sum(len(t.encode()) for t in self.texts)


def read_texts(root: str, source: str | None = None) -> list[str]:
    """Texts of an instances dataset (of one `source` when given), in manifest order."""
    texts = []
    for part in io.read_instances_manifest(root)["parts"]:
        table = io.read_part(io.join(root, io.plain_name(part["name"], f"{root} part")), ["text", "source"])
        for text, src in zip(table["text"].to_pylist(), table["source"].to_pylist()):
            if source is None or src == source:
                texts.append(text)
    return texts


def outside_prose() -> list[str]:
    """The Python Language Reference's topics (pydoc_data.topics), one text per topic, by name."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def _ngrams(text: str) -> set[int]:
    words = re.findall(r"\w+", text.lower())
    return {int.from_bytes(hashlib.blake2b(" ".join(words[i:i + NGRAM]).encode(), digest_size=8).digest(), "big")
            for i in range(len(words) - NGRAM + 1)}


class Decontaminator:
    """Holds the word 13-grams of the training text; drops near-duplicates of it."""

    def __init__(self, training_texts: list[str]):
        self.seen: set[int] = set()
        for text in training_texts:
            self.seen |= _ngrams(text)

    def overlap(self, text: str) -> float:
        grams = _ngrams(text)
        return len(grams & self.seen) / len(grams) if grams else 0.0

    def clean(self, texts: list[str]) -> tuple[list[str], int]:
        kept = [t for t in texts if self.overlap(t) < NEAR_DUPLICATE]
        return kept, len(texts) - len(kept)


def capped(texts: list[str], max_bytes: int, seed: str) -> list[str]:
    """At most `max_bytes` of texts, drawn in a seeded hash order (not the first files')."""
    order = sorted(texts, key=lambda t: hashlib.sha256(f"{seed}:{t}".encode()).hexdigest())
    out, used = [], 0
    for text in order:
        if used >= max_bytes:
            break
        out.append(text)
        used += len(text.encode())
    return out


def pool_folder(run: str) -> str:
    """What a run's students select from and train on: the pool, or all the instances when the
    reference was given (no D_ref split off)."""
    pool = os.path.join(run, "pool")
    return pool if os.path.exists(os.path.join(pool, io.MANIFEST)) else os.path.join(run, "instances")


def build_eval_sets(run: str, max_bytes: int = EVAL_BYTES) -> list[EvalSet]:
    """The sets above for a finished demo/pipeline run folder, each at most `max_bytes` (a source
    D_ref does not hold, or a run without D_ref, has no slice)."""
    guard = Decontaminator(read_texts(pool_folder(run)))
    raw = [("heldout", read_texts(os.path.join(run, "heldout")), f"{run}/heldout")]
    if os.path.exists(os.path.join(run, "d_ref", io.MANIFEST)):  # D_ref is split off when the reference trains here
        raw += [(source, read_texts(os.path.join(run, "d_ref"), source), f"{run}/d_ref, source {source}")
                for source in SOURCES]
        raw = [r for r in raw if r[1]]
    raw.append((OUTSIDE, outside_prose(), "pydoc_data.topics (Python Language Reference, PSF License 2.0)"))
    sets = []
    for name, texts, origin in raw:
        clean, dropped = guard.clean(texts)
        sets.append(EvalSet(name=name, texts=capped(clean, max_bytes, name), dropped=dropped, origin=origin))
    return sets


# ---------------------------------------------------------------- scoring


def evaluate_on_sets(model_dir: str, sets: list[EvalSet], cache: str) -> dict[str, float]:
    """Bits per byte of a checkpoint on every set, kept in the JSON file `cache` and recomputed
    only for a set whose texts, or a model whose weights, changed."""
    from miniplm.models import model_fingerprint

    fingerprint = model_fingerprint(model_dir)
    cached = io.read_json(cache) if os.path.exists(cache) else {}
    if cached.get("model") != fingerprint:
        cached = {"model": fingerprint, "bits_per_byte": {}}
    keys = {s.name: f"{s.name}:{io.hash_json(s.texts)}" for s in sets}
    missing = {s.name: s.texts for s in sets if keys[s.name] not in cached["bits_per_byte"]}
    if missing:
        for name, bits in bits_per_byte(model_dir, missing).items():
            cached["bits_per_byte"][keys[name]] = bits
        io.write_json(cache, cached)
    return {name: cached["bits_per_byte"][key] for name, key in keys.items()}


def bits_per_byte(model_dir: str, texts: dict[str, list[str]], batch_tokens: int = 16384) -> dict[str, float]:
    """Per set of texts, -sum log p / (ln 2 x UTF-8 bytes) under a local checkpoint (loaded once),
    scored in this process with the score stage's exact windowed log-likelihoods."""
    from transformers.utils import logging as hf_logging

    from miniplm.models import context_length, prefix_token_id
    from miniplm.models import load_model, load_tokenizer
    from miniplm.scoring.logprob import SequenceScorer

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a weights-loading bar per model is noise in the demo's console
    try:
        model = load_model(model_dir, device="cpu", dtype="float32")
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    tok = load_tokenizer(model_dir)
    context = context_length(model.config)
    scorer = SequenceScorer(model, max_length=context, stride=context // 2, batch_tokens=batch_tokens,
                            prefix_id=prefix_token_id(tok))
    out = {}
    for name, batch in texts.items():
        ids = tok(batch, add_special_tokens=False)["input_ids"]
        logprob = float(scorer.score([np.asarray(x, dtype=np.int64) for x in ids]).sum())
        out[name] = -logprob / (math.log(2) * sum(len(t.encode()) for t in batch))
    return out
