"""The demo's built-in teacher: trained once, for longer than a demo can afford, and shipped
with miniplm, so that `miniplm demo` trains only the reference and the students.

It is the `mini` preset (~1.1M parameters) trained on 2.5M tokens of the sample corpus's D_ref
(fraction 0.5, seed 1, keyed on the text), with the tokenizer trained on that corpus's pool:
exactly what the demo used to train first, for 8 of its 14 minutes. `python
jobs/build_demo_teacher.py` rebuilds it; `provenance.json` beside the weights records that
command, the corpus (fingerprint, Python, package versions), the split, the training config and
the sha256 of every file, which every use checks. A config names it with the keyword `builtin`
(`teacher.checkpoint: builtin`, `tokenizer: builtin`).

The split is keyed on the text, so a text of the teacher's D_ref lands in D_ref on every machine
too: however another machine's sample corpus differs (other package versions, another size),
no text of its pool was in the teacher's training data.
"""

from __future__ import annotations

import functools
import hashlib
import os

from miniplm import io

BUILTIN = "builtin"
ASSET = os.path.join(os.path.dirname(__file__), "assets", "demo-teacher")
PROVENANCE = "provenance.json"
COMMAND = "python jobs/build_demo_teacher.py"
# the teacher the demo trained before it shipped one, on the demo's corpus and train settings
RECIPE = ["tokenizer=null", "vocab_size=2048", "teacher={preset: mini, tokens: 2500000, data: d_ref}"]
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provenance(path: str = ASSET) -> dict:
    file = os.path.join(path, PROVENANCE)
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file}: the built-in demo teacher is missing; rebuild it with `{COMMAND}`")
    return io.read_json(file)


@functools.lru_cache(maxsize=None)
def verified(path: str = ASSET) -> str:
    """The built-in teacher's folder, after checking every file against its recorded sha256."""
    for name, expected in provenance(path)["files"].items():
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file}: missing from the built-in demo teacher; reinstall miniplm "
                                    f"or rebuild it with `{COMMAND}`")
        actual = file_sha256(file)
        if actual != expected:
            raise ValueError(f"{file}: sha256 {actual[:16]}... is not the {expected[:16]}... recorded "
                             f"in {PROVENANCE}; reinstall miniplm or rebuild it with `{COMMAND}`")
    return path


def describe(sample_fingerprint: str | None) -> str:
    """What the demo's teacher is, and how this run's corpus relates to its own (None: the run's
    corpus is not the sample corpus)."""
    record = provenance(verified())
    corpus = record["corpus"]
    head = (f"teacher: built in ({record['teacher']}, sha256 verified), built by `{record['command']}` "
            f"on sample corpus {corpus['fingerprint']} (Python {corpus['python']}).\n")
    if sample_fingerprint is None:
        return head + ("This run's corpus is not the sample corpus: the built-in teacher is a demo model "
                       "that has seen only the sample corpus; for real data name a real teacher checkpoint.")
    same = ("the same corpus" if sample_fingerprint == corpus["fingerprint"] else
            "another corpus (other package versions or another size)")
    return head + (f"This run's sample corpus is {sample_fingerprint}: {same}. D_ref is keyed on the text, "
                   "so no text of this pool was in the teacher's training data.")


def split_settings(path: str = ASSET) -> dict:
    """The D_ref split the built-in teacher was trained on: a pipeline using it must split alike."""
    return provenance(path)["split"]
