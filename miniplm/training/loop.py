"""The training loop every Ray Train worker runs: AdamW with warmup + cosine, gradient
accumulation and clipping, bf16 autocast on GPU, periodic held-out loss, checkpoints through
Ray Train (restored on a re-run or after a lost worker) and one metrics line per step."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time

import fsspec

from miniplm import io
from miniplm.data.sampler import CacheSampler
from miniplm.data.tokens import read_sequences
from miniplm.models import load_tokenizer
from miniplm.training.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay that lands on lr * min_lr_ratio at the last step
    (step total_steps - 1, the last one taken)."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    decay_steps = cfg.total_steps - 1 - o.warmup_steps
    progress = (step - o.warmup_steps) / decay_steps if decay_steps > 0 else 1.0
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ---------------------------------------------------------------- the loop (runs on every worker)


def train_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoModelForCausalLM

    from miniplm.config import build
    from miniplm.models import config_from_dict
    from miniplm.training import distill
    from miniplm.training.flops import measure_peak_flops, table_peak

    cfg: TrainConfig = build(TrainConfig, loop_config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    hf_config = config_from_dict(loop_config["hf_config"])
    raw_model = AutoModelForCausalLM.from_config(hf_config).to(device)  # the student
    # its loss (and the frozen teacher of cfg.kd, loaded after the student's init, kept out of
    # the student's module tree: no gradient, optimizer state, DDP sync or checkpoint)
    objective = distill.build_objective(raw_model, cfg, device)
    teacher = objective.teacher
    student_fpt, teacher_fpt = objective.flops_per_token(cfg.data.seq_len)
    model = ray.train.torch.prepare_model(objective)  # DDP when world > 1
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step, cfg) / cfg.optim.lr)
    state = {"step": 0, "tokens": 0, "epoch": 0, "batches_in_epoch": 0}
    checkpoint = ray.train.get_checkpoint()  # set on a re-run and after a worker failure
    if checkpoint:
        with checkpoint.as_directory() as d:
            saved = load_state(os.path.join(d, "state.pt"))
        if saved.get("run") != loop_config["run"]:  # run_train checks first; this guards a stray restore
            raise RuntimeError(f"train: the checkpoint in {cfg.output} belongs to a run with other settings")
        raw_model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])  # with the learning rate of the step to come
        state = saved["state"]
        if "schedule" in saved:
            schedule.load_state_dict(saved["schedule"])
        else:  # a checkpoint from before the schedule was an LR scheduler
            schedule.last_epoch = state["step"]
            for group in opt.param_groups:
                group["lr"] = lr_at(state["step"], cfg)
        torch.set_rng_state(saved["rng"])
    if rank == 0:  # the driver's progress bar follows this log (miniplm.training.progress)
        metrics = MetricsLog(io.join(cfg.output, "metrics.jsonl"), resume_step=state["step"])

    eval_seqs = None
    if loop_config.get("eval_cache") and rank == 0:
        root, manifest = loop_config["eval_cache"]
        eval_seqs = torch.from_numpy(read_sequences(root, manifest, cfg.eval.max_sequences))
    peak, peak_source = ((cfg.peak_flops, "config: peak_flops") if cfg.peak_flops else
                         table_peak(device) or (measure_peak_flops(device), "measured matmul rate"))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    resumed_from = state["step"]
    cache_root, cache_manifest = loop_config["cache"]
    sampler = CacheSampler(cache_root, cache_manifest, seed=cfg.seed, rank=rank, world=world,
                           window=cfg.data.shuffle_window, micro_batch=cfg.micro_batch)
    batches = micro_batches(sampler, state)
    seq_tokens = cfg.micro_batch * cfg.data.seq_len
    last_time = time.perf_counter()
    for step in range(state["step"], cfg.total_steps):
        lr = schedule.get_last_lr()[0]
        loss_sum = torch.zeros(3, device=device)  # total, LM, KL
        for micro in range(cfg.grad_accum):
            x = next(batches).to(device)  # (B, T)
            sync = micro == cfg.grad_accum - 1 or world == 1
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                losses = model(x)  # (3,): total, LM, KL; chunked, no [B, T, V] float32 logits
            (losses[0] / cfg.grad_accum).backward()
            loss_sum += losses.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                   cfg.optim.grad_clip or float("inf"))
        # (4,): total, LM, KL, gradient norm, as every rank sees them
        stats = torch.cat([loss_sum / cfg.grad_accum, grad_norm.reshape(1).to(loss_sum)])
        stats = mean_over_ranks(stats, world)
        total, lm, kl, norm = stats.tolist()
        if not all(math.isfinite(v) for v in (total, lm, kl, norm)):
            # before the update: no checkpoint or metrics line holds this step, and every rank
            # stops here alike (none is left waiting in a collective or at ray.train.report)
            if rank == 0:
                metrics.flush()  # the curve up to here, on object storage too
            raise RuntimeError(diverged_message(step + 1, total, norm))
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        state["step"] = step + 1
        state["tokens"] += seq_tokens * cfg.grad_accum * world

        now = time.perf_counter()
        dt, last_time = now - last_time, now
        tokens_per_s = seq_tokens * cfg.grad_accum * world / dt
        row = {"step": state["step"], "tokens": state["tokens"],
               "flops": (student_fpt + teacher_fpt) * state["tokens"],
               "student_flops": student_fpt * state["tokens"], "teacher_flops": teacher_fpt * state["tokens"],
               "loss": round(total, 6),
               **({"lm_loss": round(lm, 6), "kd_loss": round(kl, 6)} if teacher is not None else {}),
               "lr": lr, "grad_norm": round(float(grad_norm), 6),
               "tokens_per_s": round(tokens_per_s, 1), "passes": state["epoch"],
               "mfu": round((student_fpt + teacher_fpt) * tokens_per_s / (peak * world), 5),
               "mfu_peak_source": peak_source}
        if step == resumed_from:  # how FLOPs were counted, once per start of the loop
            row["flops_formula"] = objective.flops_formula(cfg.data.seq_len)
        last = state["step"] == cfg.total_steps
        if checkpoint and step == resumed_from:  # where a restore happened, for whoever reads the log
            row["resumed_from"] = resumed_from
        if eval_seqs is not None and (last or (cfg.eval.every and state["step"] % cfg.eval.every == 0)):
            row["eval_loss"] = round(eval_loss(objective, eval_seqs, cfg.micro_batch, device), 6)
        checkpoint_now = state["step"] % cfg.checkpoint_every == 0 or last
        if checkpoint_now and world > 1:  # DDP health: every replica must hold the same weights
            row["replica_param_sums"] = replica_param_sums(raw_model, world)
        if rank == 0:
            noteworthy = last or checkpoint_now or row.keys() & {"eval_loss", "resumed_from", "flops_formula"}
            if state["step"] % cfg.log_every == 0 or noteworthy:
                metrics.append(row)
        if checkpoint_now:
            if rank == 0:
                metrics.flush()
            save_checkpoint(raw_model, opt, schedule, state, rank, row, loop_config["run"])
    if rank == 0:
        metrics.flush()
        save_final(raw_model, cfg)


def mean_over_ranks(values, world: int):
    """Each value's mean over the DDP ranks. Every rank gets the very same numbers, so a
    decision taken on them (stop on a non-finite loss) is taken by all ranks or by none."""
    import torch

    if world > 1:
        # SUM then divide: gloo has ReduceOp.AVG only since torch 2.8
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
        values /= world
    return values


def diverged_message(step: int, loss: float, grad_norm: float) -> str:
    return (f"train: the run diverged at step {step}: loss {loss:.6g}, gradient norm {grad_norm:.6g} "
            "(not finite); it stopped before that step's update, and no checkpoint holds it. A re-run "
            "with the same settings resumes from the last checkpoint and diverges again: lower optim.lr "
            "or lengthen optim.warmup_steps, and re-run with overwrite=true")


def load_state(path: str) -> dict:
    """A checkpoint's model, optimizer, counters and RNG state, on the host (load_state_dict
    copies to the model's device; the RNG state must stay a CPU tensor). weights_only: a
    checkpoint on shared or object storage must not be able to run code on every worker
    that restores it."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def save_final(model, cfg: TrainConfig) -> None:
    """The trained model + its tokenizer as a standard HF checkpoint in OUTPUT/final."""
    final = io.join(cfg.output, "final")
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    with io.writing(final):
        if io.is_local(final):  # saved beside it, then renamed: never half a checkpoint named final/
            target = io.local_path(final)
            staging = f"{target}.partial"
            shutil.rmtree(staging, ignore_errors=True)  # a killed save's leftovers
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            shutil.rmtree(target, ignore_errors=True)
            os.rename(staging, target)
            return
        with tempfile.TemporaryDirectory() as d:  # elsewhere `_done.json`, written after, says it is whole
            model.save_pretrained(d)
            tokenizer.save_pretrained(d)
            io.upload_dir(d, final)


def micro_batches(sampler: CacheSampler, state: dict):
    """Endless (B, T) micro-batches: passes over the corpus repeat, each in its own order, and a
    resumed run starts where the checkpointed one stopped without reading what came before."""
    import torch

    while True:
        for batch in sampler.epoch_batches(state["epoch"], start=state["batches_in_epoch"]):
            state["batches_in_epoch"] += 1
            yield torch.from_numpy(batch)
        state["epoch"] += 1
        state["batches_in_epoch"] = 0


def replica_param_sums(model, world: int) -> list[float]:
    import torch

    local = float(sum(p.detach().double().sum() for p in model.parameters()))
    sums = [None] * world
    torch.distributed.all_gather_object(sums, local)
    return sums


def eval_loss(objective, seqs, micro_batch: int, device) -> float:
    """The student's mean next-token loss on held-out sequences (chunked LM head, no teacher)."""
    import torch

    objective.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(seqs), micro_batch):
            x = seqs[i:i + micro_batch].to(device)
            total += objective.lm_loss(x).item() * len(x)
            n += len(x)
    objective.train()
    return total / n


def save_checkpoint(model, opt, schedule, state: dict, rank: int, metrics: dict, run: str) -> None:
    """Rank 0 writes the state; every rank reports (ray.train.report is a barrier)."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "schedule": schedule.state_dict(), "state": dict(state),
                        "rng": torch.get_rng_state(), "run": run}, os.path.join(d, "state.pt"))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step-{state['step']:08d}")


class MetricsLog:
    """OUTPUT/metrics.jsonl, one JSON line per logged step. A resumed run re-does the steps after
    its checkpoint, so their lines are dropped first. Local files are appended line by line;
    object stores cannot append, so there the file is rewritten at every checkpoint and at the end."""

    def __init__(self, url: str, resume_step: int):
        self.url, self.local = url, io.is_local(url)
        rows = load_metrics(url) if io.exists(url) else []
        # re-serialised: a kept last line may lack its newline, and the next append needs one
        self.lines = [json.dumps(row) + "\n" for row in rows if row["step"] <= resume_step]
        self._rewrite()

    def append(self, row: dict) -> None:
        line = json.dumps(row) + "\n"
        self.lines.append(line)
        if self.local:
            with io.writing(self.url):
                append_line(io.local_path(self.url), line)

    def flush(self) -> None:
        if not self.local:
            self._rewrite()

    def _rewrite(self) -> None:
        io.write_bytes(self.url, "".join(self.lines).encode())


def load_metrics(url: str) -> list[dict]:
    """The rows of a metrics.jsonl (resume and `miniplm report` read it). A run killed while it
    appended leaves a torn last line: that one is dropped, and said so; a bad line before the
    end is no kill's doing, and an error naming the file and the line."""
    with fsspec.open(url, "rb") as f:
        lines = [(n, line) for n, line in enumerate(f.read().split(b"\n"), 1) if line.strip()]
    rows = []
    for n, line in lines:
        try:
            rows.append(metrics_row(line))
        except ValueError:
            if n != lines[-1][0]:
                raise ValueError(f"{url}: line {n} is not a JSON metrics row: {line[:80]!r}; only a "
                                 "torn last line is skipped, so fix or remove this one") from None
            print(f"{url}: dropped its last line {n} ({len(line)} bytes), torn by a run stopped "
                  "while writing it", flush=True)
    return rows


def metrics_row(line: bytes) -> dict:
    row = json.loads(line)  # bytes that are not UTF-8 raise a ValueError too
    if not isinstance(row, dict) or "step" not in row:
        raise ValueError("not a metrics row")
    return row


def append_line(path: str, line: str) -> None:
    """Append `line` with one write call, not in buffer-sized pieces: a kill leaves it whole
    or absent (short of a failing disk, which load_metrics survives on the last line)."""
    data = line.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:  # a regular file takes it all at once; a short write is finished, not lost
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


