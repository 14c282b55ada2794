"""The train stage's config: model, data, optimiser, evaluation, online distillation and budget.
Its own module so that the loop every Ray Train worker runs (`miniplm.training.loop`) and the stage that
launches it (`miniplm.training.train`) both import it, and neither imports the other."""

from __future__ import annotations

import dataclasses
import math

from miniplm.config import field
from miniplm.data.tokens import DataSpec
from miniplm.models import PRESETS, ModelSpec


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
    data: str | None = field(None, path=True, help="held-out instances dataset for periodic eval loss")
    every: int = field(0, help="evaluate every this many steps (0: only at the end)")
    max_sequences: int = field(64, help="held-out sequences per evaluation, spread evenly over the set")


@dataclasses.dataclass(kw_only=True)
class KDSpec:
    """Online token-level knowledge distillation (the paper's "vanilla KD" baseline)."""
    teacher: str = field(model=True, keywords=("teacher",),
                         help="teacher checkpoint folder, URL or Hub id (with its tokenizer, which must be "
                              "the student's); in a pipeline, `teacher` names the pipeline's teacher")
    weight: float = field(0.5, help="KL share w: loss = (1 - w) * LM + w * KL(p_teacher || p_student)")
    temperature: float = field(1.0, help="softmax temperature tau of both models in the KL "
                                         "(the KL is scaled by tau^2)")

    def __post_init__(self):
        if not 0 <= self.weight <= 1:
            raise ValueError(f"kd.weight must be in [0, 1], got {self.weight}")
        if not self.temperature > 0:
            raise ValueError(f"kd.temperature must be > 0, got {self.temperature}")


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    output: str = field(path=True, help="run folder: metrics.jsonl, checkpoints, final/ model")
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
    torch_threads: int | None = field(None, help="CPU threads torch uses on each worker (default: "
                                                 "cpus_per_worker, at least 1). More than the "
                                                 "reserved CPUs lets training use cores that Ray "
                                                 "Data's streaming tasks leave idle most of the time")
    seed: int = field(0, help="model init and data order seed (each pass: its own order)")
    token_cache: str | None = field(None, path=True, help="root of token caches, shared by runs "
                                                          "on the same data (default: OUTPUT/tokens)")
    checkpoint_every: int = field(50, help="checkpoint every this many steps")
    keep_checkpoints: int = field(2, help="checkpoints kept (latest)")
    log_every: int = field(1, help="write a metrics line every this many steps")
    max_failures: int = field(0, help="worker failures survived by restoring the last checkpoint")
    peak_flops: float | None = field(None, help="per-worker peak FLOP/s for MFU (default: the GPU's "
                                                "dense bf16 peak where known, else a measured "
                                                "matmul rate; metrics say which)")
    kd: KDSpec | None = field(None, help="online distillation from a teacher (default: none)")
    activation_checkpointing: bool = field(False, help="recompute each layer's activations in the "
                                                       "backward pass: less memory, ~1/3 more compute")
    loss_chunk_tokens: int = field(1024, help="positions per LM-head block of the loss: the float32 "
                                              "logits held at once are this x vocabulary")
    overwrite: bool = field(False, help="start afresh in an output made with other settings "
                                        "(the token cache is kept: it is keyed by its content)")

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
        if self.loss_chunk_tokens < 1:
            raise ValueError(f"loss_chunk_tokens must be >= 1, got {self.loss_chunk_tokens}")
        if self.kd and self.kd.teacher == "teacher":
            raise ValueError("kd.teacher: `teacher` names a pipeline's teacher; here give a "
                             "checkpoint folder or URL (./teacher for a folder of that name)")

    @property
    def grad_accum(self) -> int:
        return self.batch_tokens // (self.data.seq_len * self.micro_batch * self.num_workers)

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else math.ceil(self.tokens / self.batch_tokens)
