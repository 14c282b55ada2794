"""train: pre-train a causal LM on any instances-shaped corpus with Ray Train.

One loop (`miniplm.training.loop`) serves teacher, reference and students. The model is an HF
`AutoModelForCausalLM.from_config` built from a preset or a config file, with the vocabulary
of a local tokenizer (`miniplm.models`). Data: Ray Data tokenises every instances part with
that tokenizer and packs the tokens into fixed `seq_len` sequences once, into a token cache
(`miniplm.data.tokens`), shared by every run that needs the same one; each worker reads its share
in a per-pass seeded order (`miniplm.data.sampler`). The budget is tokens or steps, never epochs; a corpus smaller than the budget repeats. Checkpoints go through Ray
Train into `OUTPUT/ray/`; re-running the same command resumes from the latest. The final
model is a standard HF checkpoint in `OUTPUT/final`.
"""

from __future__ import annotations

import time

from fsspec.core import url_to_fs

from miniplm import __version__, console, io
from miniplm.data.tokens import DataSpec, build_token_cache
from miniplm.models import ModelSpec, load_tokenizer_checked, model_config
from miniplm.training.config import EvalSpec, KDSpec, OptimSpec, TrainConfig

__all__ = ["DataSpec", "EvalSpec", "KDSpec", "ModelSpec", "OptimSpec", "TrainConfig", "run_train"]

DONE = "_done.json"
RUN = "_run.json"
# settings that do not change what is trained: a re-run may differ in these and still resume
NOT_SHAPING = {"output", "eval", "checkpoint_every", "keep_checkpoints", "log_every", "max_failures",
               "peak_flops", "torch_threads", "cpus_per_worker", "token_cache", "overwrite",
               "activation_checkpointing", "loss_chunk_tokens"}  # memory options, same maths


# ---------------------------------------------------------------- the stage


def _losses(metrics: dict | None) -> str:
    """", loss 6.943, held-out 7.116": the last step's, for the summary line."""
    metrics = metrics or {}
    said = [f"loss {metrics['loss']:.3f}"] if "loss" in metrics else []
    said += [f"held-out {metrics['eval_loss']:.3f}"] if "eval_loss" in metrics else []
    return "".join(", " + s for s in said)


def ray_storage(output: str) -> dict:
    """RunConfig storage arguments: checkpoints go where the run folder is. Object stores go
    through the same fsspec filesystem as every other stage, so credentials, endpoints and
    options resolve one way (and pyarrow's own S3 client is not a second one to configure)."""
    if io.is_local(output):
        return {"storage_path": io.local_path(output)}
    fs, path = url_to_fs(output)
    return {"storage_path": path, "storage_filesystem": io.arrow_filesystem(fs)}


def run_settings(cfg: TrainConfig, hf_config, tokenizer, instances_fp: str) -> dict:
    """Everything that shapes a run's trajectory (model, data content, budget, schedule, batch,
    seed), flat: a checkpoint resumes only into a run with the same settings."""
    from miniplm.config import to_dict
    from miniplm.models import tokenizer_fingerprint

    settings = {k: v for k, v in flatten(to_dict(cfg)).items() if k.split(".")[0] not in NOT_SHAPING}
    settings.pop("data.path")  # where the data is does not matter, what it is does
    settings["data.instances_fingerprint"] = instances_fp
    settings["model.tokenizer"] = tokenizer_fingerprint(tokenizer)
    settings["model.config"] = io.hash_json(hf_config.to_dict())
    settings["total_steps"] = cfg.total_steps
    if cfg.kd:  # what the teacher is, not where it lives
        from miniplm.models import model_fingerprint

        settings["kd.teacher"] = model_fingerprint(cfg.kd.teacher)
    return settings


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def previous_settings(output: str) -> dict | None:
    """The settings a run folder was made with (None: no run there yet, or an older one)."""
    path = io.join(output, RUN)
    return io.read_json(path)["settings"] if io.exists(path) else None


def claim_run(cfg: TrainConfig, settings: dict, previous: dict | None) -> None:
    """Resume only what these settings would have produced: a run folder made with other
    settings is refused, naming what differs, unless `overwrite` starts it afresh."""
    started = previous is not None or io.exists(io.join(cfg.output, "ray"))
    if started and previous != settings:
        if not cfg.overwrite:
            if previous is None:
                differs = f"unknown: no {RUN}"
            else:
                differs = ", ".join(sorted(k for k in settings.keys() | previous.keys()
                                           if previous.get(k) != settings.get(k)))
            raise ValueError(
                f"train: {cfg.output} holds a run made with other settings (differs in: {differs}); "
                "its checkpoints would resume into this one. Set overwrite=true (or remove the "
                "folder) to start afresh, or give another output")
        for name in ("ray", "final", "metrics.jsonl", DONE, RUN, "config.json"):
            path = io.join(cfg.output, name)
            if io.exists(path):
                io.remove_dir(path)
        print(f"train: overwrite: {cfg.output} starts afresh", flush=True)
    io.write_json(io.join(cfg.output, RUN), {"settings": settings})


def run_train(cfg: TrainConfig) -> dict:
    """Check the config, build the token caches, run the Ray Train job; returns a summary."""
    from miniplm.config import describe

    console.detail(describe(cfg))
    tokenizer = load_tokenizer_checked(cfg.model.tokenizer)
    hf_config = model_config(cfg.model, tokenizer, cfg.data.seq_len)  # fails before Ray starts
    if cfg.kd:
        from miniplm.training.distill import check_teacher

        check_teacher(cfg.kd.teacher, tokenizer, cfg.data.seq_len)
    settings = run_settings(cfg, hf_config, tokenizer, io.read_instances_manifest(cfg.data.path)["fingerprint"])
    io.check_apart(cfg.output, [cfg.data.path, cfg.eval.data, cfg.model.tokenizer, cfg.model.config,
                                cfg.kd.teacher if cfg.kd else None])
    io.check_made_by(cfg.output, "train", marker=RUN)
    with io.hold(cfg.output, "train"):
        return _train_into(cfg, settings, hf_config)


def _train_into(cfg: TrainConfig, settings: dict, hf_config) -> dict:
    """Resume or start the run in the (held) output folder."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from miniplm.config import to_dict
    from miniplm.runtime import init_ray
    from miniplm.training.loop import train_loop
    from miniplm.training.progress import follow_metrics

    previous = previous_settings(cfg.output)
    done_path = io.join(cfg.output, DONE)
    if previous == settings and io.exists(done_path):
        # settings outside `run_settings` (logging, eval, checkpointing, memory options,
        # overwrite) cannot change a finished run: restoring its last checkpoint would only
        # save it again
        print(f"train: {cfg.output} is already complete; nothing to do")
        return io.read_json(done_path)
    claim_run(cfg, settings, previous)
    io.write_json(io.join(cfg.output, "config.json"),
                  {"train": to_dict(cfg), "model": hf_config.to_dict(), "version": __version__})
    init_ray()
    total_cpus = ray.cluster_resources().get("CPU", 0)
    if cfg.num_workers * cfg.cpus_per_worker >= total_cpus:
        # workers hold their CPUs for the whole run: Ray Data's read tasks would never start
        raise ValueError(f"cpus_per_worker: {cfg.num_workers} worker(s) x {cfg.cpus_per_worker} CPUs "
                         f"leave none of the cluster's {total_cpus:g} CPUs for streaming the data; "
                         "lower cpus_per_worker or num_workers")
    from miniplm.cluster import check_paths_visible

    # on several nodes: every one must see the local paths its workers and tasks read and write
    # (the output holds the checkpoints Ray Train restores from after a lost node)
    check_paths_visible({"data.path": cfg.data.path, "model.tokenizer": cfg.model.tokenizer,
                         "eval.data": cfg.eval.data, "kd.teacher": cfg.kd.teacher if cfg.kd else None},
                        {"output": cfg.output, "token_cache": cfg.token_cache})
    started = time.time()
    cache_root = cfg.token_cache or io.join(cfg.output, "tokens")
    cache, cache_manifest = build_token_cache(cfg.data, cfg.model.tokenizer, cache_root)
    eval_cache = None
    if cfg.eval.data:
        eval_spec = DataSpec(path=cfg.eval.data, seq_len=cfg.data.seq_len)
        eval_cache = build_token_cache(eval_spec, cfg.model.tokenizer, cache_root)
    print(f"train: {cache_manifest['sequences']} sequences of {cfg.data.seq_len} tokens "
          f"({cache_manifest['documents']} documents); {cfg.total_steps} steps of {cfg.batch_tokens} "
          f"tokens = {cfg.total_steps * cfg.batch_tokens / max(1, cache_manifest['sequences'] * cfg.data.seq_len):.2f} passes",
          flush=True)

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": to_dict(cfg), "hf_config": hf_config.to_dict(), "eval_cache": eval_cache,
                           "cache": (cache, cache_manifest), "run": io.hash_json(settings)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name="ray", **ray_storage(cfg.output),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
    )
    with follow_metrics(io.join(cfg.output, "metrics.jsonl"), cfg.total_steps):
        result = trainer.fit()
    if result.error:
        raise result.error
    summary = {"output": cfg.output, "steps": cfg.total_steps, "final": io.join(cfg.output, "final"),
               "metrics": result.metrics, "seconds": round(time.time() - started, 1), "train": to_dict(cfg)}
    io.write_json(done_path, summary)
    print(f"train: done in {summary['seconds']}s{_losses(result.metrics)} -> {summary['final']}", flush=True)
    return summary
