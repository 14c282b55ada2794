"""score: instances + one HF causal LM -> score table (`id, n_tokens, logprob`).

Ray Data reads the instance parts, CPU tasks tokenise with the model's tokenizer, and an
actor pool (one model copy per actor, one GPU each on GPU) computes every instance's summed
log-probability (`miniplm.scoring.logprob`). The driver collects the small score rows and writes one
output part per input part as soon as all of that part's rows are in, so a killed run
re-scores only unfinished parts. Provenance (model / tokenizer / instances fingerprints,
max length, dtype, version) goes into every part's Parquet metadata and `_manifest.json`.
"""

from __future__ import annotations

import collections
import dataclasses
import posixpath
import time
import warnings
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.core import url_to_fs

from miniplm import __version__, console, hub, io
from miniplm.cluster import check_paths_visible
from miniplm.config import describe, field, to_dict
from miniplm.data.encode import text_encoder, tokenize_part
from miniplm.io import read_instances_manifest
from miniplm.models import (DTYPES, check_model_dir, check_vocab, load_model, load_tokenizer, model_fingerprint,
                            resolve_dtype, tokenizer_fingerprint)
from miniplm.scoring.logprob import PACKING

SCORE_SCHEMA = pa.schema([("id", pa.string()), ("n_tokens", pa.int64()), ("logprob", pa.float64())])


@dataclasses.dataclass(kw_only=True, frozen=True)
class ScoreConfig:
    instances: str = field(path=True, help="instances dataset folder (from `miniplm prepare` or `select`)")
    model: str = field(model=True, help="a Hugging Face causal LM and its tokenizer: an existing local folder "
                                        "(wins), a URL (s3://, gs://: downloaded once per machine), or a Hub "
                                        "id org/name[@revision] resolved through the Hugging Face cache "
                                        "(HF_HOME, HF_HUB_OFFLINE, HF_TOKEN)")
    output: str = field(path=True, help="folder for the score table (local path or fsspec URL)")
    max_length: int | None = field(None, help="context per forward pass (default: the model's)")
    stride: int | None = field(None, help="tokens each sliding window adds (default: max_length // 2)")
    batch_tokens: int = field(16384, help="padded tokens per forward pass")
    workers: int = field(1, help="scoring actors (model copies)")
    cpus_per_worker: float = field(1.0, help="CPUs reserved per scoring actor")
    gpus_per_worker: float = field(1.0, help="GPUs per scoring actor on cuda; a fraction shares one "
                                             "GPU between small models (0.25: four copies per GPU)")
    packing: str = field("auto", help="micro-batch layout: padded (rows padded to the longest window), "
                                      "packed (windows side by side in one row, no padding; needs "
                                      "flash attention to pay), or auto (packed on GPU with flash "
                                      "attention, else padded)")
    max_tries: int = field(3, help="times a part may be started on a scoring worker; a part whose "
                                   "worker dies this often (e.g. out of memory) stops the run, named")
    device: str = field("auto", help="cpu, cuda, or auto (cuda when the cluster has GPUs)")
    dtype: str = field("auto", help="auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16, float16")
    trust_remote_code: bool = field(False, help="allow model code shipped with the checkpoint")
    overwrite: bool = field(False, help="replace an output folder made with another model or instances")

    def __post_init__(self):
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.packing not in PACKING:
            raise ValueError(f"packing must be one of {', '.join(PACKING)}, got {self.packing!r}")
        if not 0 < self.gpus_per_worker <= 1:
            raise ValueError(f"gpus_per_worker must be in (0, 1], got {self.gpus_per_worker}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("batch_tokens", "workers", "max_tries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")


# ---------------------------------------------------------------- Ray Data steps


class PartKillsWorker(RuntimeError):
    """A part was started `max_tries` times and its scoring worker died every time."""


class LoadKillsWorker(RuntimeError):
    """Scoring workers died loading the model `max_tries` times (Ray restarts a dead worker
    without limit, so without this count a model that cannot load would be retried forever)."""


def _tries_dir(output: str) -> str:
    return io.join(output, io.TMP, "tries")  # cleared when a run starts and when it finishes


def record_try(output: str, part: str) -> int:
    """Note that `part` is starting on a worker; returns how often it has started in this run.
    One small file per start, so workers on other machines count together."""
    _start_marker(output, part)
    return len(_tries(output, part))


def _start_marker(output: str, what: str) -> str:
    import uuid

    fs, root = url_to_fs(_tries_dir(output))
    marker = posixpath.join(root, f"{what}.{uuid.uuid4().hex}")
    with io.writing(marker):  # the message names the part whose start could not be recorded
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(marker, b"")
    return fs.unstrip_protocol(marker)  # a URL: on object storage a bare path would name a local file


def _tries(output: str, what: str) -> list[str]:
    fs, root = url_to_fs(_tries_dir(output))
    return fs.glob(posixpath.join(root, f"{what}.*"))


def record_load(output: str, workers: int, max_tries: int, model: str) -> str:
    """Note that a worker starts loading the model; its marker is removed once the load
    succeeds, so the markers left are loads in progress (at most `workers`, this one included)
    or loads whose worker died. Stops the run when at least `max_tries` loads died."""
    marker = _start_marker(output, "load")
    died = len(_tries(output, "load")) - workers
    if died >= max_tries:
        raise LoadKillsWorker(
            f"the scoring worker died {died} times while loading {model} (out of memory? a "
            "checkpoint that crashes its process?). Nothing is lost: fix the cause (more memory per "
            "worker, fewer workers per node) and re-run the same command to resume; allow more tries "
            "with --max-tries.")
    return marker


class ScoreActor:
    """One model copy: loads once, then scores one tokenised part per row.

    All of the actor's torch work runs on one thread of its own. Ray Data builds the actor on
    the process's main thread but calls it from a pool thread; with torch on both, OpenMP keeps
    a team of threads per calling thread, counts more threads than cores, and makes its
    workers sleep at every barrier instead of spinning (measured on 2 cores: 40-86 sleeps per
    second instead of 2-3, 1.64 instead of 1.85 busy cores).
    """

    def __init__(self, model_path: str, *, device: str, dtype: str, max_length: int, stride: int,
                 batch_tokens: int, packing: str, trust_remote_code: bool, num_threads: int,
                 instances: str, output: str, max_tries: int, workers: int):
        from concurrent.futures import ThreadPoolExecutor

        def load_scorer():
            import torch

            from miniplm.models import prefix_token_id
            from miniplm.scoring.logprob import SequenceScorer

            if device == "cpu":
                torch.set_num_threads(num_threads)
            model = load_model(model_path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
            prefix = prefix_token_id(load_tokenizer(model_path, trust_remote_code))
            return SequenceScorer(model, max_length=max_length, stride=stride,
                                  batch_tokens=batch_tokens, prefix_id=prefix, packing=packing)

        import ray

        self.instances, self.output, self.max_tries = instances, output, max_tries
        self.node = ray.get_runtime_context().get_node_id()  # recorded with each part it scores
        self.torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer")
        try:
            loading = record_load(output, workers, max_tries, model_path)
        except LoadKillsWorker as err:  # raised with the first part: Ray reports a task's error as
            self.load_failure = err     # itself, an actor's __init__ error only inside its own text
            return
        self.load_failure = None
        self.scorer = self.torch_thread.submit(load_scorer).result()
        fs, path = url_to_fs(loading)
        fs.rm(path)  # loaded: not a death

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.load_failure:
            raise self.load_failure
        return pa.concat_tables(self.score_part(batch.slice(i, 1)) for i in range(batch.num_rows))

    def score_part(self, row: pa.Table) -> pa.Table:
        part = row["part"][0].as_py()
        # Ray restarts a dead worker and retries its part without limit (a lost node must not
        # end a days-long pass), so a part that kills its worker every time is stopped here
        tries = record_try(self.output, part)
        if tries > self.max_tries:
            raise PartKillsWorker(
                f"part {part} (instances file {io.join(self.instances, part)}): its scoring worker "
                f"died {tries - 1} times while scoring it (out of memory? a document the model "
                f"cannot take?). Parts already scored in {self.output} are kept: fix the cause "
                "(e.g. a smaller --batch-tokens or more memory per worker) and re-run the same "
                "command to resume; allow more tries with --max-tries.")
        ids = row["id"][0].values
        tokens = row["input_ids"][0].values  # list<int32>, one entry per instance
        offsets, flat = tokens.offsets.to_numpy(), tokens.values.to_numpy()
        sequences = [flat[offsets[i]:offsets[i + 1]] for i in range(len(ids))]
        logprob = self.torch_thread.submit(self.scorer.score, sequences).result()
        bad = np.flatnonzero(~np.isfinite(logprob))
        if len(bad):
            raise ValueError(f"{part}: non-finite log-probability ({logprob[bad[0]]}) for "
                             f"instance {ids[int(bad[0])].as_py()!r}")
        return pa.table({"part": pa.array([part] * len(ids)), "id": ids,
                         "n_tokens": row["n_tokens"][0].values, "logprob": pa.array(logprob),
                         "node": pa.array([self.node] * len(ids))})


# ---------------------------------------------------------------- the stage


def run_score(cfg: ScoreConfig, on_part_written: Callable[[str], None] | None = None,
              say: Callable[[str], None] = print) -> dict:
    """Run the score stage; returns its manifest. `on_part_written(name)` is called after
    each finished output part (progress hooks; tests use it to interrupt a run); `say` prints
    the summary line (a stage built on this one, eval, prints its own)."""
    import ray

    from miniplm.models import context_length
    from miniplm.runtime import init_ray

    console.detail(describe(cfg))
    started = time.time()
    instances = read_instances_manifest(cfg.instances)
    check_model_dir(cfg.model)
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(io.local_copy(cfg.model), trust_remote_code=cfg.trust_remote_code)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    check_vocab(hf_config, tokenizer, "--model")  # before Ray starts
    declared = context_length(hf_config)
    max_length = cfg.max_length or declared or 2048
    if declared and max_length > declared:
        warnings.warn(f"score: max_length {max_length} is past {cfg.model}'s declared context "
                      f"{declared}: positions it never trained on score worse")
    stride = cfg.stride or max(1, max_length // 2)
    init_ray()
    check_cpus_left(cfg.workers, cfg.cpus_per_worker)
    device = cfg.device
    if device == "auto":
        device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    dtype = resolve_dtype(cfg.dtype, device)
    job = {"stage": "score", "model_fingerprint": model_fingerprint(cfg.model),
           "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
           "instances_fingerprint": instances["fingerprint"],
           "max_length": max_length, "stride": stride, "dtype": dtype}
    provenance = {"model": cfg.model, "model_hub": hub.describe(cfg.model), "instances": cfg.instances, **job,
                  "version": __version__}
    with io.claim_output(cfg.output, job, overwrite=cfg.overwrite, what="a score table",
                         inputs=[cfg.instances, cfg.model]) as finished:
        if finished:
            manifest = io.read_json(io.join(cfg.output, io.MANIFEST))
            say(f"score: {cfg.output} is already complete ({manifest['rows']} rows); nothing to do")
            return manifest
        # on several nodes: every one must see the local paths the actors read and write
        check_paths_visible({"--instances": cfg.instances, "--model": cfg.model}, {"--output": cfg.output})
        manifest = _score_into(cfg, instances, provenance, device=device, dtype=dtype, max_length=max_length,
                               stride=stride, on_part_written=on_part_written, started=started)
    say(f"score: {manifest['rows']} instances, {manifest['tokens']} tokens, mean log-prob per "
          f"token {manifest['mean_logprob_per_token']:.4f}, in {manifest['seconds']:.1f}s -> {cfg.output}")
    return manifest


def _score_into(cfg: ScoreConfig, instances: dict, provenance: dict, *, device: str, dtype: str,
                max_length: int, stride: int, on_part_written, started: float) -> dict:
    """Score every part not yet in the (held) output, then check the table and finish it."""
    io.clear_tmp(cfg.output)
    expected = {io.plain_name(p["name"], f"{cfg.instances}/{io.MANIFEST} part"): p["rows"]
                for p in instances["parts"]}
    finished = {posixpath.basename(u) for u in io.list_parts(cfg.output)} & set(expected)
    pending = [name for name in expected if name not in finished]
    if finished:
        print(f"score: resuming, {len(finished)} of {len(expected)} parts already scored")
    if pending:
        ds = _scoring_pipeline(cfg, pending, device=device,
                               dtype=dtype, max_length=max_length, stride=stride)
        try:
            _collect_parts(ds, cfg.output, {n: expected[n] for n in pending}, provenance, on_part_written)
        except Exception as err:
            from miniplm.runtime import unwrap

            if isinstance(unwrap(err), (PartKillsWorker, LoadKillsWorker)):
                raise unwrap(err) from None  # its message, not Ray's remote traceback
            raise
    return _finish(cfg, provenance, expected, time.time() - started)


TOKENIZE_CPUS = 0.5  # each tokenising task's reservation


def check_cpus_left(workers: int, cpus_per_worker: float) -> None:
    """Scoring actors hold their CPUs for the whole run: refuse a pool that fits the cluster but
    leaves under one tokenising task's CPUs for reading the parts (the run would wait forever,
    silently). A pool larger than the cluster is left to an autoscaler to make room for."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    held = workers * cpus_per_worker
    if held > total:
        print(f"score: {workers} scoring worker(s) x {cpus_per_worker:g} CPUs need more than the cluster's "
              f"{total:g} CPUs now: waiting for nodes to join (an autoscaler's)", flush=True)
    elif held + TOKENIZE_CPUS > total:
        raise ValueError(f"--cpus-per-worker: {workers} scoring worker(s) x {cpus_per_worker:g} CPUs leave "
                         f"less than {TOKENIZE_CPUS:g} of the cluster's {total:g} CPUs for reading and "
                         "tokenising the parts; lower --cpus-per-worker or --workers")


def _scoring_pipeline(cfg: ScoreConfig, parts: list[str], *, device: str, dtype: str,
                      max_length: int, stride: int):
    import ray

    items = [{"part": name, "url": io.join(cfg.instances, name)} for name in parts]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(tokenize_part, fn_kwargs={"encoder": text_encoder(cfg.model, cfg.trust_remote_code)},
                        batch_size=1, batch_format="pyarrow", num_cpus=TOKENIZE_CPUS)
    return ds.map_batches(
        ScoreActor,
        fn_constructor_kwargs=dict(model_path=cfg.model, device=device, dtype=dtype,
                                   max_length=max_length, stride=stride,
                                   batch_tokens=cfg.batch_tokens, packing=cfg.packing,
                                   trust_remote_code=cfg.trust_remote_code,
                                   num_threads=max(1, int(cfg.cpus_per_worker)),
                                   instances=cfg.instances, output=cfg.output, max_tries=cfg.max_tries,
                                   workers=cfg.workers),
        compute=ray.data.ActorPoolStrategy(size=cfg.workers),
        batch_size=1,
        batch_format="pyarrow",
        num_gpus=cfg.gpus_per_worker if device == "cuda" else 0,
        num_cpus=cfg.cpus_per_worker,
        # a lost actor (preempted node, OOM-killed process) is restarted and its part retried:
        # Ray Data's actor pools default to max_restarts=-1, max_task_retries=-1 (passing them
        # is deprecated). A part that kills its worker every time is bounded by `max_tries`.
    )


def _collect_parts(ds, output: str, expected: dict[str, int], provenance: dict,
                   on_part_written: Callable[[str], None] | None) -> None:
    """Buffer score rows per input part; write a part the moment its last row arrives."""
    from miniplm.runtime import waiting_for

    buffers: dict[str, list[pa.Table]] = collections.defaultdict(list)
    nodes: dict[str, set] = collections.defaultdict(set)  # the nodes whose actors scored a part
    counts: collections.Counter = collections.Counter()
    bar = console.progress(sum(expected.values()), desc="score", unit="inst", waiting_for=waiting_for)
    tokens, started = 0, time.time()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        names = np.array(batch.column("part").to_pylist())
        for name in np.unique(names):
            rows = batch.filter(pa.array(names == name))
            nodes[name].update(rows.column("node").unique().to_pylist())
            rows = rows.select(SCORE_SCHEMA.names)
            buffers[name].append(rows)
            counts[name] += rows.num_rows
            if counts[name] > expected[name]:
                raise RuntimeError(f"part {name}: got {counts[name]} score rows for "
                                   f"{expected[name]} instances (duplicated rows)")
            if counts[name] == expected[name]:
                _write_part(output, name, buffers.pop(name), provenance, ",".join(sorted(nodes.pop(name))))
                if on_part_written:
                    on_part_written(name)
        tokens += pc.sum(batch.column("n_tokens")).as_py() or 0
        bar.update(batch.num_rows)
        bar.set_postfix(tok_s=f"{tokens / max(time.time() - started, 1e-9):,.0f}")
    bar.close()
    missing = {n: expected[n] - counts[n] for n in expected if counts[n] != expected[n]}
    if missing:
        raise RuntimeError(f"score rows missing for parts {missing} (instances changed while scoring?)")


def _write_part(output: str, name: str, tables: list[pa.Table], provenance: dict, node: str) -> None:
    table = pa.concat_tables(tables).cast(SCORE_SCHEMA)
    table = table.sort_by("id")  # deterministic: the same table whatever order rows arrived in
    io.write_parquet(io.join(output, name), table, metadata=provenance, node=node)


def _finish(cfg: ScoreConfig, provenance: dict, expected: dict[str, int], seconds: float) -> dict:
    """Check the finished table against the instances and write its manifest."""
    rows = tokens = 0
    logprob = 0.0
    parts = []
    for name, n in expected.items():
        table = io.read_part(io.join(cfg.output, name), ["n_tokens", "logprob"])
        if table.num_rows != n:
            raise RuntimeError(f"{cfg.output}/{name}: {table.num_rows} rows, expected {n}")
        part_tokens = pc.sum(table["n_tokens"]).as_py() or 0
        rows, tokens = rows + n, tokens + part_tokens
        logprob += pc.sum(table["logprob"]).as_py() or 0.0
        parts.append({"name": name, "rows": n, "tokens": part_tokens, "node": io.node_of(table.schema)})
    manifest = {"stage": "score", "version": __version__, "config": to_dict(cfg), "provenance": provenance,
                "rows": rows, "tokens": tokens, "logprob": logprob,
                "mean_logprob_per_token": logprob / tokens if tokens else float("nan"),
                "parts": parts, "seconds": round(seconds, 2)}
    io.write_manifest(cfg.output, manifest)
    return manifest
