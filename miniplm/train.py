"""train: pre-train a causal LM on any instances-shaped corpus with Ray Train.

One loop serves teacher, reference and students. The model is an HF
`AutoModelForCausalLM.from_config` built from a preset or a config file, with the vocabulary
of a local tokenizer. Data: Ray Data tokenises every instances part with that tokenizer and
packs the tokens into fixed `seq_len` sequences with EOS between documents, once, into a
token cache (`OUTPUT/tokens/`); workers stream it through `get_dataset_shard`. The budget is
tokens or steps, never epochs; a corpus smaller than the budget repeats. AdamW, linear warmup
and cosine decay to a floor, gradient clipping and accumulation to a global batch in tokens,
bf16 autocast on GPU. Checkpoints go through Ray Train into `OUTPUT/ray/`; re-running the same
command resumes from the latest. The final model is a standard HF checkpoint in `OUTPUT/final`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time

import numpy as np
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from miniplm import __version__, io
from miniplm.config import field

DONE = "_done.json"

# preset -> (model_type, config kwargs, context). Paper students (MiniPLM, Qwen family):
# 200M / 500M / 1.2B; llama-small and mamba-small are for KD across model families.
PRESETS: dict[str, tuple[str, dict, int]] = {
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4), 1024),
    "mini": ("llama", dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=4), 1024),
    "small": ("llama", dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                            num_attention_heads=4, num_key_value_heads=4), 1024),
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
    config: str | None = field(None, help="HF config.json (or its folder) instead of a preset")
    tokenizer: str | None = field(None, help="local tokenizer folder (save_pretrained layout)")


@dataclasses.dataclass(kw_only=True)
class DataSpec:
    path: str = field(help="instances dataset to train on (prepare or select output)")
    seq_len: int = field(256, help="tokens per packed training sequence")
    fraction: float = field(1.0, help="train on a seeded random subset of this fraction")
    seed: int = field(0, help="seed of the subset and of the sequence order")


@dataclasses.dataclass(kw_only=True)
class OptimSpec:
    lr: float = field(1e-3, help="peak learning rate")
    min_lr_ratio: float = field(0.1, help="cosine decays to lr * this")
    warmup_steps: int = field(10, help="linear warmup steps")
    weight_decay: float = field(0.1, help="AdamW weight decay (matrices only)")
    beta1: float = field(0.9, help="AdamW beta1")
    beta2: float = field(0.95, help="AdamW beta2")
    grad_clip: float = field(1.0, help="clip the global gradient norm to this (0: off)")


@dataclasses.dataclass(kw_only=True)
class EvalSpec:
    data: str | None = field(None, help="held-out instances dataset for periodic eval loss")
    every: int = field(0, help="evaluate every this many steps (0: only at the end)")
    max_sequences: int = field(64, help="held-out sequences per evaluation")


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    output: str = field(help="run folder: metrics.jsonl, checkpoints, final/ model")
    model: ModelSpec = field(help="model shape and tokenizer")
    data: DataSpec = field(help="training corpus")
    optim: OptimSpec = dataclasses.field(default_factory=OptimSpec)
    eval: EvalSpec = dataclasses.field(default_factory=EvalSpec)
    tokens: int | None = field(None, help="training budget in tokens (or give steps)")
    steps: int | None = field(None, help="training budget in optimizer steps (or give tokens)")
    batch_tokens: int = field(8192, help="global batch in tokens (accumulates micro-batches)")
    micro_batch: int = field(8, help="sequences per worker per forward pass")
    num_workers: int = field(1, help="Ray Train workers (DDP ranks)")
    use_gpu: bool = field(False, help="one GPU per worker, NCCL, bf16 autocast")
    cpus_per_worker: float = field(1.0, help="CPUs reserved per worker")
    seed: int = field(0, help="model init and data order seed")
    checkpoint_every: int = field(50, help="checkpoint every this many steps")
    keep_checkpoints: int = field(2, help="checkpoints kept (latest)")
    log_every: int = field(1, help="write a metrics line every this many steps")
    max_failures: int = field(0, help="worker failures survived by restoring the last checkpoint")
    peak_flops: float | None = field(None, help="per-worker peak FLOP/s for MFU (default: measured)")

    def __post_init__(self):
        if self.model.preset is None and self.model.config is None:
            raise ValueError("model: give model.preset or model.config")
        if self.model.preset is not None and self.model.config is None and self.model.preset not in PRESETS:
            raise ValueError(f"model.preset: unknown preset {self.model.preset!r} "
                             f"(known: {', '.join(PRESETS)})")
        if not self.model.tokenizer:
            raise ValueError("model.tokenizer: a tokenizer folder is required "
                             "(train one with `miniplm train-tokenizer`)")
        if (self.tokens is None) == (self.steps is None):
            raise ValueError("tokens / steps: give exactly one training budget")
        budget_key = "tokens" if self.tokens is not None else "steps"
        if getattr(self, budget_key) <= 0:
            raise ValueError(f"{budget_key}: the budget must be > 0")
        if not 0 < self.data.fraction <= 1:
            raise ValueError(f"data.fraction must be in (0, 1], got {self.data.fraction}")
        per_step = self.data.seq_len * self.micro_batch * self.num_workers
        if self.batch_tokens % per_step:
            raise ValueError(f"batch_tokens: {self.batch_tokens} is not a multiple of seq_len x "
                             f"micro_batch x num_workers = {per_step}")
        for name in ("micro_batch", "num_workers", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def grad_accum(self) -> int:
        return self.batch_tokens // (self.data.seq_len * self.micro_batch * self.num_workers)

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else math.ceil(self.tokens / self.batch_tokens)


# ---------------------------------------------------------------- model


def is_tokenizer_dir(path: str) -> bool:
    """A folder written by a tokenizer's save_pretrained (local or URL)."""
    return io.exists(io.join(path, "tokenizer_config.json"))


def load_tokenizer_checked(path: str):
    from miniplm.score import load_tokenizer

    if not is_tokenizer_dir(path):
        raise ValueError(f"model.tokenizer: no tokenizer folder (tokenizer_config.json) at {path}")
    tok = load_tokenizer(path)
    if tok.eos_token_id is None:
        raise ValueError(f"model.tokenizer: {path} has no EOS token to separate documents")
    return tok


def model_config(spec: ModelSpec, tokenizer, seq_len: int):
    """The HF config to build, checked against the tokenizer and the sequence length."""
    from transformers import AutoConfig

    from miniplm.logprob import context_length

    specials = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    if spec.config:
        url = spec.config if spec.config.endswith(".json") else io.join(spec.config, "config.json")
        config = AutoConfig.from_pretrained(io.local_copy(url))
        if config.vocab_size < len(tokenizer):
            raise ValueError(f"model.config: vocab_size {config.vocab_size} is smaller than the "
                             f"tokenizer's {len(tokenizer)}")
        where = "model.config"
    else:
        model_type, kwargs, context = PRESETS[spec.preset]
        if model_type != "mamba":
            kwargs = dict(kwargs, max_position_embeddings=context)
        config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), tie_word_embeddings=True,
                                      **specials, **kwargs)
        where = f"model.preset {spec.preset}"
    context = context_length(config)
    if context is not None and seq_len > context:
        raise ValueError(f"data.seq_len: {seq_len} exceeds the model's context {context} ({where})")
    for name in ("hidden_dropout", "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    return config


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- token cache


def cache_key(cfg_data: DataSpec, instances_fp: str, tokenizer_fp: str) -> str:
    key = json.dumps([instances_fp, tokenizer_fp, cfg_data.seq_len, cfg_data.fraction, cfg_data.seed])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def in_subset(ids: list[str], fraction: float, seed: int) -> np.ndarray:
    """A seeded, order-independent subset: keep an id when its hash falls below `fraction`."""
    if fraction >= 1:
        return np.ones(len(ids), dtype=bool)
    h = [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "little")
         for i in ids]
    return np.array(h, dtype=np.float64) / 2.0**64 < fraction


def pack_part(batch: dict, tokenizer_path: str, seq_len: int, fraction: float, seed: int,
              output: str) -> dict:
    """CPU task: one instances part -> packed `seq_len` sequences (EOS after every document),
    shuffled with a seed; the partial last sequence is dropped and counted."""
    from miniplm.score import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    stats = []
    for part, url in zip(batch["part"], batch["url"]):
        with fsspec.open(str(url), "rb") as f:
            table = pq.read_table(f, columns=["id", "text"])
        keep = in_subset(table["id"].to_pylist(), fraction, seed)
        texts = [t for t, k in zip(table["text"].to_pylist(), keep) if k]
        ids = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
        stream = np.fromiter((t for doc in ids for t in (*doc, tok.eos_token_id)), dtype=np.int32)
        n_seq = len(stream) // seq_len
        seqs = stream[: n_seq * seq_len].reshape(n_seq, seq_len)
        rng = np.random.default_rng([seed, int(hashlib.md5(str(part).encode()).hexdigest()[:8], 16)])
        seqs = seqs[rng.permutation(n_seq)]
        values = pa.array(seqs.reshape(-1))
        column = pa.FixedSizeListArray.from_arrays(values, seq_len)
        io.write_parquet(io.join(output, str(part)), pa.table({"input_ids": column}))
        stats.append(json.dumps({"part": str(part), "sequences": n_seq, "documents": len(texts),
                                 "tokens": int(len(stream)), "dropped_tokens": int(len(stream) - n_seq * seq_len)}))
    return {"stats": stats}


def build_token_cache(data: DataSpec, tokenizer_path: str, output: str) -> tuple[str, dict]:
    """Tokenise + pack an instances dataset once (skipped when already built)."""
    import ray

    from miniplm.score import load_tokenizer, read_instances_manifest, tokenizer_fingerprint

    instances = read_instances_manifest(data.path)
    key = cache_key(data, instances["fingerprint"], tokenizer_fingerprint(load_tokenizer(tokenizer_path)))
    root = io.join(output, "tokens", key)
    if io.exists(io.join(root, io.MANIFEST)):
        return root, io.read_json(io.join(root, io.MANIFEST))
    done = {p.rsplit("/", 1)[-1] for p in io.list_parts(root)}
    todo = [{"part": p["name"], "url": io.join(data.path, p["name"])}
            for p in instances["parts"] if p["name"] not in done]
    stats = {}
    if io.exists(io.join(root, "_stats.json")):
        stats = io.read_json(io.join(root, "_stats.json"))
    if todo:
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        ds = ds.map_batches(pack_part, fn_kwargs=dict(tokenizer_path=tokenizer_path, seq_len=data.seq_len,
                                                      fraction=data.fraction, seed=data.seed, output=root),
                            batch_size=1, num_cpus=0.5)
        for row in ds.iter_rows():
            s = json.loads(row["stats"])
            stats[s["part"]] = s
            io.write_json(io.join(root, "_stats.json"), stats)
    parts = [{"name": p["name"], "rows": stats[p["name"]]["sequences"]} for p in instances["parts"]]
    manifest = {"instances": data.path, "instances_fingerprint": instances["fingerprint"],
                "tokenizer": tokenizer_path, "seq_len": data.seq_len, "fraction": data.fraction,
                "seed": data.seed, "parts": parts,
                "sequences": sum(p["rows"] for p in parts),
                "documents": sum(s["documents"] for s in stats.values()),
                "tokens": sum(s["tokens"] for s in stats.values()),
                "dropped_tokens": sum(s["dropped_tokens"] for s in stats.values())}
    if manifest["sequences"] == 0:
        raise ValueError(f"data.path: {data.path} yields no {data.seq_len}-token sequence "
                         f"(fraction {data.fraction}); lower data.seq_len or add data")
    io.write_manifest(root, manifest)
    return root, manifest


def read_sequences(root: str, manifest: dict, limit: int | None = None) -> np.ndarray:
    """(N, seq_len) int64 token ids from a token cache (for held-out evaluation)."""
    out, n = [], 0
    for part in manifest["parts"]:
        if not part["rows"]:
            continue
        with fsspec.open(io.join(root, part["name"]), "rb") as f:
            col = pq.read_table(f)["input_ids"].combine_chunks()
        out.append(col.values.to_numpy().reshape(len(col), -1))
        n += len(col)
        if limit and n >= limit:
            break
    seqs = np.concatenate(out).astype(np.int64)
    return seqs[:limit] if limit else seqs


# ---------------------------------------------------------------- schedule and metrics


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at the last step."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, cfg.total_steps - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def measure_peak_flops(device) -> float:
    """Achievable dense matmul FLOP/s on this worker (fp32 on CPU, bf16 on GPU): MFU's denominator."""
    import torch

    dtype, n = (torch.bfloat16, 8192) if device.type == "cuda" else (torch.float32, 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps, start = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


# ---------------------------------------------------------------- the loop (runs on every worker)


def train_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoModelForCausalLM

    from miniplm.config import build

    cfg: TrainConfig = build(TrainConfig, loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    hf_config = loop_config["hf_config"]
    model = AutoModelForCausalLM.from_config(hf_config).to(device)
    n_params = count_params(model)
    model = ray.train.torch.prepare_model(model)  # DDP when world > 1
    raw_model = model.module if hasattr(model, "module") else model
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    state = {"step": 0, "tokens": 0, "epoch": 0, "batches_in_epoch": 0}
    checkpoint = ray.train.get_checkpoint()  # set on a re-run and after a worker failure
    if checkpoint:
        with checkpoint.as_directory() as d:
            saved = torch.load(os.path.join(d, "state.pt"), map_location=device, weights_only=False)
        raw_model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state = saved["state"]
        torch.set_rng_state(saved["rng"])
    if rank == 0:
        metrics = MetricsLog(io.join(cfg.output, "metrics.jsonl"), resume_step=state["step"])
        if checkpoint:
            print(f"train: resumed from step {state['step']} ({state['tokens']} tokens)", flush=True)

    eval_seqs = None
    if loop_config.get("eval_cache") and rank == 0:
        root, manifest = loop_config["eval_cache"]
        eval_seqs = torch.from_numpy(read_sequences(root, manifest, cfg.eval.max_sequences))
    peak = cfg.peak_flops or measure_peak_flops(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()

    resumed_from = state["step"]
    batches = micro_batches(ray.train.get_dataset_shard("train"), cfg, state)
    seq_tokens = cfg.micro_batch * cfg.data.seq_len
    bar = _progress(rank, cfg.total_steps, state["step"])
    last_time = time.perf_counter()
    for step in range(state["step"], cfg.total_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            x = next(batches).to(device)  # (B, T)
            sync = micro == cfg.grad_accum - 1 or world == 1
            with (_null() if sync else model.no_sync()), autocast:
                loss = model(input_ids=x, labels=x).loss
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                   cfg.optim.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] = step + 1
        state["tokens"] += seq_tokens * cfg.grad_accum * world
        loss_avg = loss_sum / cfg.grad_accum
        if world > 1:
            torch.distributed.all_reduce(loss_avg, op=torch.distributed.ReduceOp.AVG)

        now = time.perf_counter()
        dt, last_time = now - last_time, now
        tokens_per_s = seq_tokens * cfg.grad_accum * world / dt
        row = {"step": state["step"], "tokens": state["tokens"], "flops": 6 * n_params * state["tokens"],
               "loss": round(loss_avg.item(), 6),
               "lr": lr_at(step, cfg), "grad_norm": round(float(grad_norm), 6),
               "tokens_per_s": round(tokens_per_s, 1), "passes": state["epoch"],
               "mfu": round(6 * n_params * tokens_per_s / (peak * world), 5)}
        last = state["step"] == cfg.total_steps
        if checkpoint and step == resumed_from:  # where a restore happened, for whoever reads the log
            row["resumed_from"] = resumed_from
        if eval_seqs is not None and (last or (cfg.eval.every and state["step"] % cfg.eval.every == 0)):
            row["eval_loss"] = round(eval_loss(raw_model, eval_seqs, cfg.micro_batch, device), 6)
        checkpoint_now = state["step"] % cfg.checkpoint_every == 0 or last
        if checkpoint_now and world > 1:  # DDP health: every replica must hold the same weights
            row["replica_param_sums"] = replica_param_sums(raw_model, world)
        if rank == 0:
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
            noteworthy = last or checkpoint_now or row.keys() & {"eval_loss", "resumed_from"}
            if state["step"] % cfg.log_every == 0 or noteworthy:
                metrics.append(row)
        if checkpoint_now:
            if rank == 0:
                metrics.flush()
            save_checkpoint(raw_model, opt, state, rank, row)
    if rank == 0:
        bar.close()
        metrics.flush()
        save_final(raw_model, cfg)


def save_final(model, cfg: TrainConfig) -> None:
    """The trained model + its tokenizer as a standard HF checkpoint in OUTPUT/final."""
    from miniplm.score import load_tokenizer

    final = io.join(cfg.output, "final")
    with tempfile.TemporaryDirectory() as d, io.writing(final):
        target = io.local_path(final) if io.is_local(final) else d
        model.save_pretrained(target)
        load_tokenizer(cfg.model.tokenizer).save_pretrained(target)
        if target == d:
            io.upload_dir(d, final)


def micro_batches(shard, cfg: TrainConfig, state: dict):
    """Endless micro-batches of (B, T) token ids: passes over the corpus repeat, and a resumed
    run skips what the checkpointed run already consumed in the current pass."""
    import torch

    skip = state["batches_in_epoch"]
    while True:
        n = 0
        for batch in shard.iter_torch_batches(batch_size=cfg.micro_batch, drop_last=True,
                                              dtypes=torch.long):
            n += 1
            if n <= skip:
                continue
            state["batches_in_epoch"] = n
            yield batch["input_ids"]
        if n == 0:
            raise RuntimeError("train: this worker's share of the corpus holds less than one micro-batch")
        skip = 0
        state["epoch"] += 1
        state["batches_in_epoch"] = 0


def replica_param_sums(model, world: int) -> list[float]:
    import torch

    local = float(sum(p.detach().double().sum() for p in model.parameters()))
    sums = [None] * world
    torch.distributed.all_gather_object(sums, local)
    return sums


def eval_loss(model, seqs, micro_batch: int, device) -> float:
    import torch

    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(seqs), micro_batch):
            x = seqs[i:i + micro_batch].to(device)
            total += model(input_ids=x, labels=x).loss.item() * len(x)
            n += len(x)
    model.train()
    return total / n


def save_checkpoint(model, opt, state: dict, rank: int, metrics: dict) -> None:
    """Rank 0 writes the state; every rank reports (ray.train.report is a barrier)."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": dict(state),
                        "rng": torch.get_rng_state()}, os.path.join(d, "state.pt"))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step-{state['step']:08d}")


class MetricsLog:
    """OUTPUT/metrics.jsonl, one JSON line per logged step. A resumed run re-does the steps after
    its checkpoint, so their lines are dropped first. Local files are appended line by line;
    object stores cannot append, so there the file is rewritten at every checkpoint and at the end."""

    def __init__(self, url: str, resume_step: int):
        self.url, self.local = url, io.is_local(url)
        self.lines: list[str] = []
        if io.exists(url):
            with fsspec.open(url, "r") as f:
                self.lines = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
        self._rewrite()

    def append(self, row: dict) -> None:
        line = json.dumps(row) + "\n"
        self.lines.append(line)
        if self.local:
            with io.writing(self.url), fsspec.open(self.url, "a") as f:
                f.write(line)

    def flush(self) -> None:
        if not self.local:
            self._rewrite()

    def _rewrite(self) -> None:
        io.write_bytes(self.url, "".join(self.lines).encode())


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(rank: int, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=rank != 0)


# ---------------------------------------------------------------- the stage


def ray_storage(output: str) -> dict:
    """RunConfig storage arguments: checkpoints go where the run folder is. Object stores go
    through the same fsspec filesystem as every other stage, so credentials, endpoints and
    options resolve one way (and pyarrow's own S3 client is not a second one to configure)."""
    if io.is_local(output):
        return {"storage_path": io.local_path(output)}
    fs, path = url_to_fs(output)
    return {"storage_path": path, "storage_filesystem": io.arrow_filesystem(fs)}


def run_train(cfg: TrainConfig) -> dict:
    """Check the config, build the token caches, run the Ray Train job; returns a summary."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from miniplm.config import describe, to_dict
    from miniplm.runtime import init_ray

    print(describe(cfg), flush=True)
    tokenizer = load_tokenizer_checked(cfg.model.tokenizer)
    hf_config = model_config(cfg.model, tokenizer, cfg.data.seq_len)  # fails before Ray starts
    done_path = io.join(cfg.output, DONE)
    if io.exists(done_path) and io.read_json(done_path)["train"] == to_dict(cfg):
        print(f"train: {cfg.output} is already complete; nothing to do")
        return io.read_json(done_path)
    io.write_json(io.join(cfg.output, "config.json"),
                  {"train": to_dict(cfg), "model": hf_config.to_dict(), "version": __version__})
    init_ray()
    total_cpus = ray.cluster_resources().get("CPU", 0)
    if cfg.num_workers * cfg.cpus_per_worker >= total_cpus:
        # workers hold their CPUs for the whole run: Ray Data's read tasks would never start
        raise ValueError(f"cpus_per_worker: {cfg.num_workers} worker(s) x {cfg.cpus_per_worker} CPUs "
                         f"leave none of the cluster's {total_cpus:g} CPUs for streaming the data; "
                         "lower cpus_per_worker or num_workers")
    started = time.time()
    cache, cache_manifest = build_token_cache(cfg.data, cfg.model.tokenizer, cfg.output)
    eval_cache = None
    if cfg.eval.data:
        eval_spec = DataSpec(path=cfg.eval.data, seq_len=cfg.data.seq_len)
        eval_cache = build_token_cache(eval_spec, cfg.model.tokenizer, cfg.output)
    print(f"train: {cache_manifest['sequences']} sequences of {cfg.data.seq_len} tokens "
          f"({cache_manifest['documents']} documents); {cfg.total_steps} steps of {cfg.batch_tokens} "
          f"tokens = {cfg.total_steps * cfg.batch_tokens / max(1, cache_manifest['sequences'] * cfg.data.seq_len):.2f} passes",
          flush=True)

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the same data order on a resumed run
    parts = [io.join(cache, p["name"]) for p in cache_manifest["parts"] if p["rows"]]
    # parts follow the corpus files (often one source each): shuffle globally, seeded, so every
    # step mixes sources and a resumed run sees the same order
    dataset = ray.data.read_parquet(parts).random_shuffle(seed=cfg.data.seed)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": to_dict(cfg), "hf_config": hf_config, "eval_cache": eval_cache},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name="ray", **ray_storage(cfg.output),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(execution_options=ctx.execution_options),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    summary = {"output": cfg.output, "steps": cfg.total_steps, "final": io.join(cfg.output, "final"),
               "metrics": result.metrics, "seconds": round(time.time() - started, 1), "train": to_dict(cfg)}
    io.write_json(done_path, summary)
    print(f"train: done in {summary['seconds']}s -> {summary['final']}", flush=True)
    return summary
