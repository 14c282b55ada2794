"""Models and tokenizers: named presets, building an HF config for training, loading a
checkpoint for scoring, and the fingerprints that say what a model or tokenizer is (so a
score table, a token cache or a refined corpus knows exactly what made it)."""

from __future__ import annotations

import dataclasses
import functools
import posixpath
import warnings

from fsspec.core import url_to_fs

from miniplm import hub, io
from miniplm.config import field

DTYPES = ("auto", "float32", "bfloat16", "float16")

# preset -> (model_type, config kwargs, context). The paper's (MiniPLM, Qwen family) reference
# qwen-104m and students 200M / 500M / 1.2B, counted with Qwen's 151,936-token vocabulary and tied
# embeddings; llama-small and mamba-small are for KD across model families.
PRESETS: dict[str, tuple[str, dict, int]] = {
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4), 1024),
    "mini": ("llama", dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=4), 1024),
    "small": ("llama", dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                            num_attention_heads=4, num_key_value_heads=4), 1024),
    "qwen-104m": ("qwen2", dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                num_attention_heads=8, num_key_value_heads=8), 2048),
    "qwen-200m": ("qwen2", dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                num_attention_heads=12, num_key_value_heads=12), 2048),
    "qwen-500m": ("qwen2", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, num_key_value_heads=16), 2048),
    "qwen-1.2b": ("qwen2", dict(hidden_size=1536, intermediate_size=6144, num_hidden_layers=28,
                                num_attention_heads=16, num_key_value_heads=16), 2048),
    "llama-small": ("llama", dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                  num_attention_heads=8, num_key_value_heads=8), 2048),
    "mamba-small": ("mamba", dict(hidden_size=256, num_hidden_layers=8, state_size=16), 1 << 20),
}


@dataclasses.dataclass(kw_only=True)
class ModelSpec:
    preset: str | None = field("tiny", help="named model shape (see PRESETS); or give `config`")
    config: str | None = field(None, path=True, help="HF config.json (or its folder) instead of a preset")
    tokenizer: str | None = field(None, model=True, help="tokenizer: a folder (save_pretrained layout), a URL, "
                                                         "or a Hugging Face Hub id org/name[@revision]")


# ---------------------------------------------------------------- loading


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Cached per worker process: Ray reuses workers, so each loads the tokenizer once."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(io.local_copy(path), trust_remote_code=trust_remote_code)
    tok.model_max_length = 1 << 62  # we window long texts ourselves; silence the length warning
    return tok


def load_model(path: str, *, device: str, dtype: str, trust_remote_code: bool = False):
    """A checkpoint for inference: weights read straight onto `device` (no full copy in host
    memory first), in `dtype` (auto: bfloat16 on cuda), with flash attention on cuda where
    the flash-attn package is installed (packed scoring rows need its varlen kernels)."""
    import torch
    import transformers
    from packaging.version import Version
    from transformers import AutoModelForCausalLM

    # transformers 4.56 renamed torch_dtype to dtype (and warns on the old name); we support both
    dtype_arg = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    kwargs = {dtype_arg: getattr(torch, resolve_dtype(dtype, device)), "trust_remote_code": trust_remote_code}
    if device != "cpu":  # weights straight onto the GPU, never staged in host memory
        kwargs["device_map"] = device
    attention = attention_implementation(device)
    if attention:
        try:
            return AutoModelForCausalLM.from_pretrained(io.local_copy(path), attn_implementation=attention,
                                                        **kwargs).eval()
        except (ValueError, ImportError) as err:  # an architecture without flash-attention support
            warnings.warn(f"{path}: {attention} unavailable ({err}); using the model's default attention")
    return AutoModelForCausalLM.from_pretrained(io.local_copy(path), **kwargs).eval()


def attention_implementation(device: str) -> str | None:
    """flash_attention_2 on cuda when installed; otherwise the model's default (sdpa)."""
    if device != "cuda":
        return None
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if is_flash_attn_2_available() else None


def resolve_dtype(dtype: str, device: str) -> str:
    """auto: bfloat16 weights on cuda (the scorer's log-softmax is float32 regardless),
    float32 on cpu."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" else "float32"


def check_model_dir(path: str) -> None:
    if not io.exists(io.join(path, "config.json")):
        raise FileNotFoundError(f"--model {path}: no config.json there; expected a folder "
                                "written by save_pretrained (model + tokenizer)")


def model_fingerprint(path: str) -> str:
    """Config + weights content: the same checkpoint copied elsewhere keeps its fingerprint.
    Remembered by file identity, so re-runs do not re-read the weights."""
    fs, root = url_to_fs(path)
    weights = sorted(p for p in fs.ls(root, detail=False)
                     if p.endswith((".safetensors", ".bin", ".pt")) and "training_args" not in p)
    if not weights:
        raise FileNotFoundError(f"--model {path}: no weight files (*.safetensors, *.bin)")
    files = [posixpath.join(root, "config.json"), *weights]
    blobs = hub.content_names(path, [posixpath.basename(p) for p in files])
    if blobs:  # a Hub snapshot: its blobs are named by their content's hash, nothing to read
        return io.hash_json(["hub-blobs", blobs])
    return io.hash_files_cached([fs.unstrip_protocol(p) for p in files])


def tokenizer_fingerprint(tokenizer) -> str:
    """What the tokenizer does (vocabulary, merges, normalisation, special tokens), not where it
    lives: two checkpoints sharing a tokenizer agree, so per-token scores are comparable."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else sorted(tokenizer.get_vocab().items())
    return io.hash_json({"tokenizer": spec, "prefix": prefix_token_id(tokenizer)})


# ---------------------------------------------------------------- building a model to train


def is_tokenizer_dir(path: str) -> bool:
    """A folder written by a tokenizer's save_pretrained (local or URL)."""
    return io.exists(io.join(path, "tokenizer_config.json"))


def load_tokenizer_checked(path: str):
    if not is_tokenizer_dir(path):
        raise ValueError(f"model.tokenizer: no tokenizer folder (tokenizer_config.json) at {path}")
    tok = load_tokenizer(path)
    if tok.eos_token_id is None:
        raise ValueError(f"model.tokenizer: {path} has no EOS token to separate documents")
    return tok


def model_config(spec: ModelSpec, tokenizer, seq_len: int):
    """The HF config to build, checked against the tokenizer and the sequence length."""
    from transformers import AutoConfig

    specials = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    if spec.config:
        url = spec.config if spec.config.endswith(".json") else io.join(spec.config, "config.json")
        config = AutoConfig.from_pretrained(io.local_copy(url))
        check_vocab(config, tokenizer, "model.config")
        where = "model.config"
    else:
        model_type, kwargs, context = PRESETS[spec.preset]
        if model_type != "mamba":
            kwargs = dict(kwargs, max_position_embeddings=context)
        config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), tie_word_embeddings=True,
                                      **specials, **kwargs)
        where = f"model.preset {spec.preset}"
    context = position_limit(config)
    if context is not None and seq_len > context:
        raise ValueError(f"data.seq_len: {seq_len} exceeds the model's context {context} ({where})")
    # declared in the checkpoint, so score and eval default to the context it was trained on
    config.trained_context = seq_len
    for name in ("hidden_dropout", "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    return config


def check_vocab(config, tokenizer, key: str) -> None:
    """Refuse a model whose embedding the tokenizer's ids overflow: an IndexError on CPU and a
    device-side assert on CUDA, hours in, otherwise."""
    vocab = config.get_text_config().vocab_size
    if vocab < len(tokenizer):
        raise ValueError(f"{key}: the model's vocabulary ({vocab}) is smaller than its tokenizer's "
                         f"{len(tokenizer)} ids; pair the model with the tokenizer it was trained with")


def config_from_dict(values: dict):
    """An HF config rebuilt from its `to_dict()` (what config.json holds). Ray Train hands a
    plain dict to its workers: a config object would make its controller, which never builds
    a model, import transformers first (seconds of every run's start on a small machine)."""
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[values["model_type"]].from_dict(values)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def head_is_plain(model) -> bool:
    """Whether the model's logits are exactly `lm_head(base_model(...).last_hidden_state)`,
    so the head may be applied block by block. Checked on one short sequence: the LM head's
    output must be the returned logits bit for bit (soft-capping or scaling afterwards, even
    by a hair, fails this) and its input the backbone's last hidden state. The scorer and the
    training objective both ask it before computing the head in blocks."""
    import torch

    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or getattr(model, "base_model", model) is model:
        return False
    seen: dict = {}
    handle = head.register_forward_hook(lambda module, args, out: seen.update(hidden=args[0], out=out))
    device = head.weight.device
    ids = (torch.arange(8, device=device) % head.weight.shape[0])[None]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
            hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    except Exception as err:  # a backbone taking other inputs: keep the model's own path
        warnings.warn(f"chunked LM head unavailable for {type(model).__name__} ({err})")
        return False
    finally:
        handle.remove()
    return ("out" in seen and seen["out"].shape == logits.shape and torch.equal(seen["out"], logits)
            and seen["hidden"].shape == hidden.shape
            and torch.allclose(seen["hidden"], hidden, rtol=1e-5, atol=1e-6))


def prefix_token_id(tokenizer) -> int:
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a BOS nor an EOS token "
                         "to start sequences with")
    return int(token)


def position_limit(config) -> int | None:
    """The most positions the architecture can take (its position table or rotary range)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def context_length(config) -> int | None:
    """The context a model works in: the one it was trained on where its checkpoint declares it
    (`trained_context`, written by `miniplm train`), else its architecture's limit."""
    limit, trained = position_limit(config), getattr(config, "trained_context", None)
    if isinstance(trained, int) and trained > 0:
        return min(trained, limit) if limit else trained
    return limit
