"""train-tokenizer: a byte-level BPE tokenizer trained on an instances dataset with the
`tokenizers` library, saved in the Hugging Face layout (for users without a checkpoint, and
for the demo, where teacher, reference and students are all trained here)."""

from __future__ import annotations

import dataclasses
from typing import Iterator


from miniplm import console, io
from miniplm.config import describe, field

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "bos_token": "<s>"}


@dataclasses.dataclass(kw_only=True, frozen=True)
class TokenizerConfig:
    instances: str = field(path=True, help="instances dataset to learn the vocabulary from")
    output: str = field(path=True, help="folder for the tokenizer (local path)")
    vocab_size: int = field(8192, help="vocabulary size, special tokens included")
    max_documents: int | None = field(None, help="learn from at most this many instances")
    overwrite: bool = field(False, help="replace a tokenizer this stage made with other settings")

    def __post_init__(self):
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size must be >= 300 (256 bytes + merges), got {self.vocab_size}")


def iter_texts(root: str, limit: int | None = None) -> Iterator[str]:
    from miniplm.io import read_instances_manifest

    n = 0
    for part in read_instances_manifest(root)["parts"]:
        for text in io.read_part(io.join(root, part["name"]), ["text"])["text"].to_pylist():
            if limit is not None and n >= limit:
                return
            n += 1
            yield text


def run_train_tokenizer(cfg: TokenizerConfig) -> str:
    """Train and save the tokenizer (reused when this output holds one trained the same way)."""
    from miniplm.io import read_instances_manifest

    console.detail(describe(cfg))
    job = {"stage": "train-tokenizer", "instances_fingerprint": read_instances_manifest(cfg.instances)["fingerprint"],
           "vocab_size": cfg.vocab_size, "max_documents": cfg.max_documents}
    with io.claim_output(cfg.output, job, overwrite=cfg.overwrite, what="a tokenizer",
                         inputs=[cfg.instances]) as finished:
        if finished:
            print(f"train-tokenizer: {cfg.output} is already complete; nothing to do")
            return cfg.output
        _train_into(cfg)
    return cfg.output


def _train_into(cfg: TokenizerConfig) -> None:
    import os

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True)
    tok.train_from_iterator(iter_texts(cfg.instances, cfg.max_documents), trainer)
    # saved aside, moved in, then the manifest: a killed save leaves no tokenizer that looks whole
    staging = io.join(cfg.output, io.TMP, "tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS).save_pretrained(staging)
    for name in sorted(os.listdir(staging)):
        os.replace(os.path.join(staging, name), os.path.join(cfg.output, name))
    io.write_manifest(cfg.output, {"stage": "train-tokenizer", "vocab_size": tok.get_vocab_size(),
                                   "config": {k: getattr(cfg, k) for k in ("instances", "vocab_size", "max_documents")}})
    print(f"train-tokenizer: {tok.get_vocab_size()} tokens -> {cfg.output}")
