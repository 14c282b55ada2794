"""Ray tasks tokenise with `miniplm.data.encode.TextEncoder`: the HF tokenizer's own Rust backend,
handed over by the driver, so that a task does not import transformers (and with it torch).
It must encode exactly as the HF tokenizer does."""

from __future__ import annotations

import sys

import pytest

# whitespace only, accents and emoji, special tokens written inside a text, one long text
EDGE_TEXTS = ["", " ", "\n\n  \t", "héllo wörld — ünïcode ✓ 🚀 ﬁ", "a </s> and <s> inside", "word " * 2000]


@pytest.fixture(scope="module")
def unigram_dir(documents, tmp_path_factory):
    """A SentencePiece-style tokenizer (Unigram, NFKC normalizer, Metaspace), unlike the
    byte-level BPE of the other fixtures."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(documents, trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<s>", "<unk>"], unk_token="<unk>"))
    out = tmp_path_factory.mktemp("tok_unigram")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(out)
    return out


@pytest.mark.parametrize("fixture", ["tokenizer_dir", "gpt2_eos_only_dir", "unigram_dir"])
def test_encoder_gives_the_hf_tokenizers_ids(fixture, documents, request):
    from transformers import AutoTokenizer

    from miniplm.data.encode import text_encoder

    path = str(request.getfixturevalue(fixture))
    hf = AutoTokenizer.from_pretrained(path)
    encoder = text_encoder(path)
    assert encoder.backend is not None  # a fast tokenizer travels as its backend, not its path
    texts = documents + EDGE_TEXTS
    assert encoder.encode(texts) == hf(texts, add_special_tokens=False)["input_ids"]
    assert (encoder.bos_token_id, encoder.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)


def test_a_task_encodes_without_importing_transformers_or_torch(tokenizer_dir, documents, ray_session):
    import ray

    from miniplm.data.encode import text_encoder

    encoder = text_encoder(str(tokenizer_dir))

    # its own runtime env: a new worker process, which no earlier task has imported anything into
    @ray.remote(runtime_env={"env_vars": {"MINIPLM_FRESH_WORKER": "1"}})
    def encode_in_a_task(encoder, texts):
        return encoder.encode(texts), sorted(m for m in ("transformers", "torch") if m in sys.modules)

    ids, imported = ray.get(encode_in_a_task.remote(encoder, documents[:20]))
    assert ids == encoder.encode(documents[:20])
    assert imported == []
