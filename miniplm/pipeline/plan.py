"""plan: a pipeline YAML resolved and checked before any work, with what the run would cost.

`miniplm plan CONFIG` (and `miniplm run CONFIG --dry-run`) takes the YAML and `--set` overrides
`run` takes. It writes nothing (no folder, no miniplm cache entry; a Hub id's config and tokenizer
files land in huggingface_hub's own cache, never its weights) and starts no Ray. It reads: model
configs (in memory, local or remote) and local tokenizers; the corpus's file listing and sizes;
the first documents of the corpus, read by prepare's own readers. A remote (s3://, gs://)
tokenizer is not loaded: that would mean copying its folder. It prints

  - every step of the pipeline (`pipeline.step_markers`) and whether it runs or is reused;
  - the inputs: files, count and bytes; each model and tokenizer, where it was found;
  - the corpus's size, estimated from the first SAMPLE_DOCS documents: their instances (split at
    corpus.max_chars, as prepare splits) tokenised by each tokenizer the run uses give tokens per
    text byte; text bytes (and instances) per stored byte, measured over the stored bytes those
    documents came from (decompressed where the files are compressed), scale them to the corpus;
  - teacher and reference forward FLOPs over the pool and each trained model's FLOPs, counted
    as the project counts them (`flops.flops_per_token` on a model built on the meta device;
    scoring attends over the mean instance, as `report` counts the offline pass), and GPU-hours
    at an achieved `tflops` per GPU;
  - disk for each step's output, uncompressed (Parquet's zstd makes the tables smaller): tables,
    token caches, and each trained model's checkpoints and final weights;
  - every problem it can see, each naming its config key. A fatal one would fail the run and makes
    the exit status 2; a warning (a budget that repeats the corpus) does not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import textwrap
import uuid

from miniplm import hub, io

DEFAULT_TFLOPS = 200.0  # achieved bf16 TFLOP/s per H100 (~20% of peak): README, GPU-hours
SAMPLE_DOCS = 200  # documents tokenised for the tokens-per-byte estimate
PREFIX_BYTES = 4 << 20  # content bytes read from the start of each sampled file, at most
BYTES_PER_TOKEN = 4.0  # assumed for a tokenizer plan cannot read (trained by the run, or remote)
ASSUMED = "assumed"  # CorpusEstimate.tokens key of that assumption
TOKEN_BYTES = 4  # int32 token ids in a token cache
SCORE_ROW = 4 + 8 + 8  # a score table row besides its id: string offset, n_tokens int64, logprob float64
WEIGHT_BYTES = 4  # float32 parameters in a final checkpoint (training keeps fp32 weights)
STATE_BYTES = 12  # per parameter in a resumable checkpoint: fp32 weights + AdamW's two fp32 moments
WIDTH = 110  # console columns
REMOTE_TOKENIZER = (f"its tokenizer's checks are left to the run, its tokens are estimated at {BYTES_PER_TOKEN:g} "
                    "bytes each, and a model trained with it is not counted")


@dataclasses.dataclass
class Problem:
    key: str  # the config key to fix
    message: str
    fatal: bool = True  # the run would fail on it (warnings: it would run, maybe not as meant)


@dataclasses.dataclass
class Step:
    name: str  # as the pipeline prints it
    marker: str  # the file whose presence makes the pipeline reuse the step
    status: str  # runs | reused
    flops: float | None = None
    gpu_hours: float | None = None
    disk_bytes: float | None = None


@dataclasses.dataclass
class Inputs:
    key: str
    files: list[str]
    bytes: int  # as stored (compressed size where the files are compressed)
    compressed: bool
    note: str = ""


@dataclasses.dataclass
class CorpusEstimate:
    stored_bytes: int
    text_bytes: float
    documents: float
    instances: float
    tokens: dict[str, float]  # per tokenizer folder, and ASSUMED: text tokens of the corpus
    sampled_documents: int
    sampled_files: int
    exact: bool  # every file was read whole: bytes, documents and instances are counts
    note: str


@dataclasses.dataclass
class ModelCost:
    step: str  # the pipeline step that spends it
    model: str  # Hub id@commit, folder, or preset
    params: int  # weights each token is multiplied by (flops.matmul_params)
    weights: int  # every parameter once: what a checkpoint stores
    context: int  # tokens of attention context per token
    flops_per_token: int  # training: the student's, plus an online KD teacher's forward
    tokens: float
    flops: float
    gpu_hours: float
    data: str | None = None  # training: the corpus it reads (pool, d_ref, refined, random)
    tokenizer: str | None = None  # training: the tokenizer it reads it with (None: the run's)
    corpus_tokens: float | None = None  # training: the tokens that corpus holds


@dataclasses.dataclass
class Plan:
    config: str
    output: str | None
    tflops: float
    steps: list[Step] = dataclasses.field(default_factory=list)
    inputs: list[Inputs] = dataclasses.field(default_factory=list)
    models: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> resolved folder or file
    corpus: CorpusEstimate | None = None
    costs: list[ModelCost] = dataclasses.field(default_factory=list)
    problems: list[Problem] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 2 if any(p.fatal for p in self.problems) else 0

    def problem(self, key: str, message: str, fatal: bool = True) -> None:
        """Record a problem once (two checks may meet the same one)."""
        found = Problem(key, message, fatal)
        if found not in self.problems:
            self.problems.append(found)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "exit_code": self.exit_code}


# ---------------------------------------------------------------- the plan


def make_plan(path: str, overrides: list[str] | None = None, *, tflops: float = DEFAULT_TFLOPS,
              address: str | None = None) -> Plan:
    """The plan of `miniplm run path --set overrides...`; nothing is written."""
    plan = Plan(config=path, output=None, tflops=tflops)
    cfg, values = load_config(path, overrides or [], plan)
    if cfg is None:
        if values is not None:  # the corpus section alone may still say what is missing
            check_inputs_only(values, plan)
        plan.notes.append("the config does not build: no steps or costs until the problems below are fixed")
        return plan
    plan.output = cfg.output
    check_output(cfg, plan)
    sample = resolve_corpus(cfg, plan)
    tokenizers = load_tokenizers(cfg, plan)
    check_scored_models(cfg, tokenizers, plan)
    if sample is not None:
        plan.corpus = estimate_corpus(sample, tokenizers, plan)
    plan.costs = model_costs(cfg, tokenizers, plan)
    plan.steps = plan_steps(cfg, plan)
    check_budgets(cfg, plan)
    if address and address != "local":
        check_cluster_paths(cfg, plan)
    return plan


# ---------------------------------------------------------------- the config and its models


def load_config(path: str, overrides: list[str], plan: Plan) -> tuple[object | None, dict | None]:
    """(the PipelineConfig, with paths absolute and Hub ids resolved to config-only snapshots, or
    None when it does not build; its raw values, None when even those do not load). Every model
    or tokenizer it names is checked first, so that each missing one is a problem of its own."""
    from miniplm.config import absolute_paths, build, load_values
    from miniplm.pipeline.run import PipelineConfig

    try:
        values = load_values(path, overrides)
    except ValueError as err:
        plan.problem("config", str(err))
        return None, None
    for key, name, kind in named_models(values):
        found = locate(key, name, kind, plan)
        if found:
            plan.models[key] = found
    try:
        return absolute_paths(build(PipelineConfig, values, resolver=hub.resolve_configs)), values
    except (ValueError, FileNotFoundError) as err:  # __post_init__: the first bad setting
        key = error_key(str(err))
        if not any(p.key == key for p in plan.problems):
            plan.problem(key, str(err))
        return None, values


def check_inputs_only(values: dict, plan: Plan) -> None:
    """The corpus files of a config that does not build as a whole."""
    from miniplm.config import absolute_paths, build
    from miniplm.pipeline.run import CorpusSpec

    try:
        corpus = absolute_paths(build(CorpusSpec, values.get("corpus") or {}), "corpus.")
    except ValueError:
        return  # already a problem of the whole config
    if corpus.inputs != ["sample"]:
        list_inputs("corpus.inputs", corpus.inputs, plan)
        list_inputs("corpus.heldout", corpus.heldout, plan)


def named_models(values: dict) -> list[tuple[str, str, str]]:
    """(key, name, kind) of every model, tokenizer or model config a raw pipeline config names,
    keywords (`builtin`, a KD student's `teacher`) left out; kind is checkpoint, tokenizer or config."""
    from miniplm.demo.teacher import BUILTIN

    def get(d, key):
        return d.get(key) if isinstance(d, dict) else None

    found = [("tokenizer", values.get("tokenizer"), "tokenizer")]
    found += [(f"{role}.checkpoint", get(values.get(role), "checkpoint"), "checkpoint")
              for role in ("teacher", "reference")]
    for i, st in enumerate(values.get("students") or []):
        teacher = get(get(st, "kd"), "teacher")
        found += [(f"students[{i}].tokenizer", get(st, "tokenizer"), "tokenizer"),
                  (f"students[{i}].config", get(st, "config"), "config"),
                  (f"students[{i}].kd.teacher", None if teacher == "teacher" else teacher, "checkpoint")]
    return [(k, v, kind) for k, v, kind in found if isinstance(v, str) and v != BUILTIN]


def locate(key: str, name: str, kind: str, plan: Plan) -> str | None:
    """The folder or file `name` resolves to; None, with a problem, where it is not there."""
    from miniplm.config import absolute_path

    try:
        path = hub.resolve_configs(name) if hub.is_hub_id(name) else absolute_path(name)
    except ValueError as err:
        plan.problem(key, f"{key}: {err}")
        return None
    need = {"checkpoint": "config.json", "tokenizer": "tokenizer_config.json",
            "config": "" if name.endswith(".json") else "config.json"}[kind]
    try:
        present = io.exists(io.join(path, need) if need else path)
    except OSError as err:  # an unreachable bucket
        plan.problem(key, f"{key}: cannot look at {path} ({err})")
        return None
    if not present:
        what = {"checkpoint": "no HF checkpoint (config.json)", "tokenizer": "no tokenizer folder "
                "(tokenizer_config.json)", "config": "no model config (config.json)"}[kind]
        plan.problem(key, f"{key}: {what} at {name}")
        return None
    return path


def error_key(message: str) -> str:
    """The config key a config error names first (`teacher.checkpoint: ...`), else `config`."""
    match = re.match(r"([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+(?:\[\d+\])?)*)(?::| must)", message)
    return match.group(1) if match else "config"


def check_output(cfg, plan: Plan) -> None:
    """What `run` would refuse about its folder: one it did not make, another sample size."""
    try:
        io.check_made_by(cfg.output, "run", marker="pipeline.json")
    except ValueError as err:
        plan.problem("output", f"output: {err}")
    sample = os.path.join(cfg.output, "sample", io.MANIFEST)
    if cfg.corpus.inputs == ["sample"] and os.path.exists(sample):
        made_with = io.read_json(sample).get("max_bytes")
        if made_with != cfg.corpus.sample_bytes:
            plan.problem("corpus.sample_bytes", f"corpus.sample_bytes: {cfg.output} holds a sample corpus "
                         f"of max_bytes {made_with}, not {cfg.corpus.sample_bytes}")


def skipped_remote(key: str, path: str, plan: Plan, *, what: str) -> bool:
    """Whether `path` is remote, so plan leaves it unread (loading it means a local copy, in
    miniplm's cache, which plan never writes): a warning, naming the key, says what is skipped."""
    if io.is_local(path):
        return False
    plan.problem(key, f"{key}: {path} is remote, and plan copies nothing to read it: {what}", fatal=False)
    return True


def load_tokenizers(cfg, plan: Plan) -> dict[str, object]:
    """Each local tokenizer the run uses, loaded, by its folder; problems for those that do not
    load. The pipeline's own tokenizer is absent when the run trains it."""
    from miniplm.models import is_tokenizer_dir, load_tokenizer
    from miniplm.pipeline.run import resolve_builtin

    scored = {f"{role}.checkpoint": resolve_builtin(getattr(cfg, role).checkpoint)
              for role in ("teacher", "reference")}
    trained = {"tokenizer": resolve_builtin(cfg.tokenizer)}
    trained.update({f"students[{i}].tokenizer": st.tokenizer for i, st in enumerate(cfg.students)})
    loaded = {}
    for key, path in {**trained, **scored}.items():
        if not path or path in loaded or skipped_remote(key, path, plan, what=REMOTE_TOKENIZER):
            continue
        if not is_tokenizer_dir(path):
            plan.problem(key, f"{key}: no tokenizer (tokenizer_config.json) in {path}; the score stage "
                         "reads a model's own tokenizer from its folder")
            continue
        try:
            tok = load_tokenizer(path)
        except (OSError, ValueError) as err:
            plan.problem(key, f"{key}: the tokenizer at {path} does not load ({err})")
            continue
        if key in trained and tok.eos_token_id is None:
            plan.problem(key, f"{key}: the tokenizer at {path} has no EOS token (training ends each document "
                         "with it)")
        elif tok.bos_token_id is None and tok.eos_token_id is None:
            plan.problem(key, f"{key}: the tokenizer at {path} has neither a BOS nor an EOS token (scoring "
                         "starts each document with one)")
        else:
            loaded[path] = tok
    return loaded


def scoring_tokenizer(cfg, role: str) -> str | None:
    """The folder of the tokenizer `role` scores with: its checkpoint's own, or the pipeline's
    (None: trained by the run)."""
    from miniplm.pipeline.run import resolve_builtin

    return resolve_builtin(getattr(cfg, role).checkpoint or cfg.tokenizer)


def check_scored_models(cfg, tokenizers: dict, plan: Plan) -> None:
    """Teacher and reference: weights where the run will look for them, a vocabulary their
    tokenizer's ids fit (score refuses one they overflow), and one tokenizer when selection
    normalises per token."""
    from miniplm.models import check_vocab, tokenizer_fingerprint
    from miniplm.pipeline.run import resolve_builtin

    for role in ("teacher", "reference"):
        key, path = f"{role}.checkpoint", resolve_builtin(getattr(cfg, role).checkpoint)
        if not path:
            continue
        try:
            if not has_weights(path):
                offline = " and HF_HUB_OFFLINE is set" if hub.describe(path) else ""
                plan.problem(key, f"{key}: no weights (*.safetensors, *.bin) in {path}{offline}")
        except OSError as err:  # an unreachable bucket
            plan.problem(key, f"{key}: cannot list {path} ({err})")
        config = read_config(key, path, plan)
        if config is not None and path in tokenizers:
            try:
                check_vocab(config, tokenizers[path], key)
            except ValueError as err:
                plan.problem(key, str(err))
    if cfg.selection.normalize != "token":
        return
    paths = [scoring_tokenizer(cfg, role) for role in ("teacher", "reference")]
    if not all(p in tokenizers for p in paths):
        return  # trained by the run (shared by both), remote, or already a problem
    prints = [tokenizer_fingerprint(tokenizers[p]) for p in paths]
    if prints[0] != prints[1]:
        plan.problem("selection.normalize", f"selection.normalize: token, but the teacher's tokenizer "
                     f"({paths[0]}) and the reference's ({paths[1]}) differ (fingerprints {prints[0][:12]} vs "
                     f"{prints[1][:12]}): select refuses per-token scores of two tokenizers. Use normalize: "
                     "byte (or auto)")


def has_weights(path: str) -> bool:
    """Weight files in a checkpoint folder (the names models.model_fingerprint hashes); a Hub
    snapshot counts as having them unless HF_HUB_OFFLINE is set (the run downloads them)."""
    if hub.describe(path) and not hub.offline():
        return True
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(path)
    return any(p.endswith((".safetensors", ".bin", ".pt")) and "training_args" not in p
               for p in fs.ls(root, detail=False))


def read_config(key: str, path: str, plan: Plan):
    """A checkpoint's model config, read in memory (no local copy of a remote one); None, with a
    problem, where it does not load."""
    from miniplm.models import config_from_dict

    try:
        return config_from_dict(io.read_json(io.join(path, "config.json")))
    except (OSError, ValueError, KeyError) as err:  # KeyError: a model_type transformers lacks
        plan.problem(key, f"{key}: the model config at {path} does not load ({type(err).__name__}: {err})")
        return None


# ---------------------------------------------------------------- the corpus


@dataclasses.dataclass
class Sample:
    """The first documents of a corpus, and what they came from."""
    instances: list[str]  # the first SAMPLE_DOCS documents' instances (what is tokenised)
    instances_bytes: int
    stored_bytes: float  # stored bytes the documents read came from
    content_bytes: int  # the same, decompressed
    text_bytes: int  # UTF-8 text of every document read
    documents: int
    all_instances: int
    files: int
    whole: bool  # every file of the corpus read to its end
    skipped: dict[str, int]


def resolve_corpus(cfg, plan: Plan) -> Sample | None:
    """List the corpus and held-out files (problems for what is missing) and sample the corpus."""
    from miniplm.demo.sample_corpus import HELDOUT_FRACTION, gather

    c = cfg.corpus
    if c.inputs == ["sample"]:
        docs, heldout, packages, _ = gather(c.sample_bytes, HELDOUT_FRACTION)
        texts = [t for group in itertools.zip_longest(*docs.values()) for t in group if t is not None]
        size = sum(len(t.encode()) for t in texts)
        plan.inputs.append(Inputs("corpus.inputs", [], size, False, "the built-in sample corpus"))
        plan.inputs.append(Inputs("corpus.heldout", [], sum(len(t.encode()) for t in heldout), False,
                                  "the sample corpus's held-out documents"))
        plan.notes.append(f"corpus: the built-in sample corpus, gathered in memory as the run will write it "
                          f"(corpus.sample_bytes {c.sample_bytes:,}: the Python standard library and "
                          f"{len(packages)} installed packages); its held-out set comes with it")
        return sample_texts(texts, size, c.max_chars)
    corpus = list_inputs("corpus.inputs", c.inputs, plan)
    list_inputs("corpus.heldout", c.heldout, plan)
    if not c.heldout:
        plan.problem("corpus.heldout", "corpus.heldout: give held-out evaluation files (or use the sample corpus)")
    if not corpus.files:
        return None
    try:
        sample = sample_files(corpus.files, c.max_chars, cfg.output)
    except (OSError, ValueError, EOFError) as err:  # a corrupt file, a bad column: prepare fails on it too
        plan.problem("corpus.inputs", f"corpus.inputs: cannot read the corpus's first documents "
                     f"({type(err).__name__}: {err})")
        return None
    if not sample.documents:
        reasons = ", ".join(f"{k} {v}" for k, v in sample.skipped.items()) or "no records"
        plan.problem("corpus.inputs", f"corpus.inputs: no document with text in the first {sample.files} "
                     f"file(s) ({reasons}); prepare reads the `text` field")
        return None
    return sample


def list_inputs(key: str, patterns: list[str], plan: Plan) -> Inputs:
    """The files behind each pattern (prepare's own expansion), with their stored sizes."""
    from fsspec.core import url_to_fs

    from miniplm.data.prepare import COMPRESSIONS, expand_inputs

    files = []
    for i, pattern in enumerate(patterns):
        try:
            files += expand_inputs([pattern])
        except (OSError, ValueError) as err:
            plan.problem(f"{key}[{i}]", f"{key}[{i}]: {err}")
    files = sorted(set(files))
    size = 0
    for url in files:
        fs, path = url_to_fs(url)
        size += fs.size(path)
    found = Inputs(key, files, size, any(f.endswith(COMPRESSIONS) for f in files))
    plan.inputs.append(found)
    return found


def sample_texts(texts: list[str], stored: int, max_chars: int) -> Sample:
    """A Sample of documents held in memory (the built-in sample corpus): every one read."""
    from miniplm.data.prepare import split_text

    pieces = [split_text(t, max_chars) for t in texts]
    first = [p for doc in pieces[:SAMPLE_DOCS] for p in doc]
    text_bytes = sum(len(t.encode()) for t in texts)
    return Sample(first, sum(len(p.encode()) for p in first), stored, text_bytes, text_bytes, len(texts),
                  sum(map(len, pieces)), 0, True, {})


def sample_files(urls: list[str], max_chars: int, output: str) -> Sample:
    """The first documents of the corpus, read from the start of its files in order, until
    SAMPLE_DOCS documents are in (at most PREFIX_BYTES of content per file)."""
    from miniplm.data.prepare import PrepareConfig, file_format

    prep = PrepareConfig(inputs=urls, output=io.join(output, "instances"), max_chars=max_chars)
    s = Sample([], 0, 0.0, 0, 0, 0, 0, 0, True, {})
    for url in urls:
        if s.documents >= SAMPLE_DOCS:
            s.whole = False
            break
        s.files += 1
        if file_format(url) == "parquet":
            stored, content, whole = parquet_start(url, prep, s)
        else:
            with file_start(url) as (local, stored, content, whole):
                take_rows(local, prep, s)
        s.whole &= whole
        s.stored_bytes += stored
        s.content_bytes += content
    return s


def take_rows(url: str, prep, s: Sample, limit: int | None = None) -> int:
    """Add the documents of `url` (the first `limit` rows) to the sample; returns the rows read."""
    from miniplm.data.prepare import read_rows, split_text

    rows = 0
    for _, text, reason in read_rows(url, prep):
        rows += 1
        if reason:
            s.skipped[reason] = s.skipped.get(reason, 0) + 1
        else:
            text = text if isinstance(text, str) else "".join(text)
            pieces = split_text(text, prep.max_chars)
            s.documents += 1
            s.text_bytes += len(text.encode("utf-8", "surrogatepass"))
            s.all_instances += len(pieces)
            if s.documents <= SAMPLE_DOCS:
                s.instances += pieces
                s.instances_bytes += sum(len(p.encode("utf-8", "surrogatepass")) for p in pieces)
        if limit is not None and rows >= limit:
            break
    return rows


def parquet_start(url: str, prep, s: Sample) -> tuple[float, float, bool]:
    """The first rows of a Parquet file into the sample, read in place; (stored bytes they
    stand for, the same, whether the whole file was read)."""
    import fsspec
    import pyarrow.parquet as pq
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url)
    with fsspec.open(url, "rb") as f:
        total = pq.ParquetFile(f).metadata.num_rows
    rows = take_rows(url, prep, s, limit=max(1, SAMPLE_DOCS - s.documents))
    stored = fs.size(path) * rows / max(1, total)
    return stored, stored, rows >= total


@contextlib.contextmanager
def file_start(url: str):
    """The first PREFIX_BYTES of a JSON or text corpus file's content (decompressed as prepare
    reads it), cut after its last whole line, as a file in fsspec's in-memory filesystem (this
    process's memory: nothing is written anywhere) for prepare's readers. Yields (its URL, the
    stored bytes it came from, its bytes, whether it is the whole file)."""
    import fsspec
    from fsspec.compression import compr
    from fsspec.core import url_to_fs
    from fsspec.utils import infer_compression

    from miniplm.data.prepare import COMPRESSIONS

    fs, path = url_to_fs(url)
    size = fs.size(path)
    with fs.open(path, "rb") as raw:
        codec = infer_compression(path)
        f = compr[codec](raw, mode="rb") if codec else raw
        data = f.read(PREFIX_BYTES + 1)
        whole = len(data) <= PREFIX_BYTES
        stored = size if whole else raw.tell()
    if not whole:  # a record cut at the end would be a bad row, not a document
        keep = data.rfind(b"\n", 0, PREFIX_BYTES) + 1 or PREFIX_BYTES
        stored, data = stored * keep / len(data), data[:keep]
    name = os.path.basename(path)
    for ext in COMPRESSIONS:
        name = name.removesuffix(ext)
    memory = fsspec.filesystem("memory")
    folder = f"/miniplm-plan-{uuid.uuid4().hex}"
    memory.pipe(f"{folder}/{name}", data)
    try:
        yield f"memory://{folder}/{name}", stored, len(data), whole
    finally:
        memory.rm(folder, recursive=True)


def estimate_corpus(sample: Sample, tokenizers: dict, plan: Plan) -> CorpusEstimate:
    """The whole corpus from its sample: counts per stored byte, tokens per text byte."""
    stored = sum(i.bytes for i in plan.inputs if i.key == "corpus.inputs")
    scale = 1.0 if sample.whole else stored / sample.stored_bytes if sample.stored_bytes else 0.0
    text_bytes = sample.text_bytes * scale
    tokens = {}
    for path, tok in tokenizers.items():
        ids = tok(sample.instances, add_special_tokens=False)["input_ids"]
        tokens[path] = text_bytes * sum(map(len, ids)) / max(1, sample.instances_bytes)
    tokens[ASSUMED] = text_bytes / BYTES_PER_TOKEN
    counted = min(sample.documents, SAMPLE_DOCS)
    if sample.whole:
        note = f"every document read; tokens counted on the first {counted:,}"
    else:
        note = (f"scaled from the first {sample.documents:,} documents ({sample.files} file(s)); tokens "
                f"counted on the first {counted:,}")
        if any(i.compressed for i in plan.inputs if i.key == "corpus.inputs"):
            note += (f"; compressed inputs: {sample.content_bytes / sample.stored_bytes:.1f}x decompressed/stored "
                     "in the sample")
    return CorpusEstimate(stored_bytes=stored, text_bytes=text_bytes, documents=sample.documents * scale,
                          instances=sample.all_instances * scale, tokens=tokens,
                          sampled_documents=sample.documents, sampled_files=sample.files, exact=sample.whole,
                          note=note)


def pool_share(cfg) -> float:
    """The share of the corpus both models score: all of it, or what D_ref leaves."""
    return 1.0 if cfg.reference.checkpoint else 1.0 - cfg.reference.fraction


def corpus_tokens(plan: Plan, tokenizer: str | None) -> float:
    tokens = plan.corpus.tokens
    return tokens.get(tokenizer, tokens[ASSUMED]) if tokenizer else tokens[ASSUMED]


# ---------------------------------------------------------------- FLOPs


class PlannedTokenizer:
    """Stands in for the tokenizer the run trains (vocab_size ids, miniplm.data.tokenizer's special
    tokens): enough to shape a model config."""
    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def meta_model(config):
    """The model of `config` on the meta device: shapes only, nothing allocated."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def describe_model(path: str) -> str:
    from miniplm.demo import teacher as demo_teacher

    found = hub.describe(path)
    if found:
        return f"{found['id']}@{found['commit'][:12]}"
    return "the built-in demo teacher" if os.path.abspath(path) == os.path.abspath(demo_teacher.ASSET) else path


def trained_tokens(tokens: int | None, steps: int | None, batch_tokens: int) -> int:
    """The tokens a training run reads: whole steps (TrainConfig.total_steps rounds a token budget up)."""
    return (steps if steps is not None else math.ceil(tokens / batch_tokens)) * batch_tokens


def model_costs(cfg, tokenizers: dict, plan: Plan) -> list[ModelCost]:
    """Teacher and reference scoring the pool (and training first, where trained here), then
    each student's training, at plan.tflops per GPU."""
    from miniplm.models import context_length
    from miniplm.models import ModelSpec, model_config
    from miniplm.pipeline.run import resolve_builtin
    from miniplm.training.flops import flops_per_token, matmul_params

    seq_len, pool, batch = cfg.train.seq_len, pool_share(cfg), cfg.train.batch_tokens
    pipeline_tok = resolve_builtin(cfg.tokenizer)

    def shaped(key: str, spec: ModelSpec, tok_path: str | None):
        """The config training builds; None where its tokenizer did not load (already a problem)."""
        if tok_path and tok_path not in tokenizers:
            return None
        try:
            return model_config(spec, tokenizers.get(tok_path) or PlannedTokenizer(cfg.vocab_size), seq_len)
        except (ValueError, OSError) as err:
            plan.problem(key, f"{key}: {err}")
            return None

    def cost(step, config, name, context, training, tokens, data=None, tok_path=None, share=0.0, extra=0):
        model = meta_model(config)
        per = flops_per_token(model, context, training=training) + extra
        weights = sum(p.numel() for p in model.parameters())
        return ModelCost(step, name, matmul_params(model), weights, context, per, tokens, per * tokens,
                         per * tokens / (plan.tflops * 1e12 * 3600), data, tok_path,
                         share * corpus_tokens(plan, tok_path) if data and plan.corpus else None)

    configs, costs = {}, []
    for role in ("teacher", "reference"):
        run, path = getattr(cfg, role), resolve_builtin(getattr(cfg, role).checkpoint)
        if path:
            config = read_config(f"{role}.checkpoint", path, plan)
            configs[role] = (config, describe_model(path)) if config is not None else None
            continue
        config = shaped(f"{role}.preset", ModelSpec(preset=run.preset), pipeline_tok)
        configs[role] = (config, f"preset {run.preset}") if config is not None else None
        if config is not None:  # trained here first, on the pool or on D_ref
            on_pool = role == "teacher" and cfg.teacher.data == "pool"
            costs.append(cost(f"train {role}", config, f"preset {run.preset}", seq_len, True,
                              trained_tokens(run.tokens, None, batch), "pool" if on_pool else "d_ref",
                              pipeline_tok, pool if on_pool else cfg.reference.fraction))
    if plan.corpus:
        for role in ("teacher", "reference"):
            if configs[role] is None:
                continue
            config, name = configs[role]
            tokens = pool * corpus_tokens(plan, scoring_tokenizer(cfg, role))
            # attention over the mean instance, within the window score picks (as `report` counts it)
            window = context_length(config) or 2048
            context = int(min(window, tokens / max(1.0, pool * plan.corpus.instances)))
            costs.append(cost(f"score {role}", config, name, context, False, tokens))
    share = {"full": pool, "refined": pool * cfg.selection.alpha, "random": pool * cfg.selection.alpha}
    for i, st in enumerate(cfg.students):
        tok_path = st.tokenizer or pipeline_tok
        key = f"students[{i}].{'config' if st.config else 'preset'}"
        if st.config and skipped_remote(key, st.config, plan, what="this student's FLOPs are not counted"):
            continue
        config = shaped(key, ModelSpec(preset=st.preset, config=st.config), tok_path)
        if config is None:
            continue
        extra = 0
        if st.kd:  # the online teacher's forward on every training token
            teacher = ((configs["teacher"] or (None,))[0] if st.kd.teacher == "teacher"
                       else read_config(f"students[{i}].kd.teacher", st.kd.teacher, plan))
            extra = flops_per_token(meta_model(teacher), seq_len, training=False) if teacher is not None else 0
        costs.append(cost(f"train student {st.name}", config, st.config or f"preset {st.preset}", seq_len, True,
                          trained_tokens(st.tokens, st.steps, batch), "pool" if st.corpus == "full" else st.corpus,
                          tok_path, share[st.corpus], extra))
    return costs


# ---------------------------------------------------------------- steps, disk, checks


def plan_steps(cfg, plan: Plan) -> list[Step]:
    """The pipeline's steps (its own markers), each with its FLOPs, GPU-hours and disk."""
    from miniplm.pipeline.run import step_markers

    steps = [Step(name, marker, "reused" if os.path.exists(marker) else "runs")
             for name, marker in step_markers(cfg).items()]
    cost = {c.step: c for c in plan.costs}
    disk = step_disk(cfg, plan)
    for step in steps:
        if step.name in cost:
            step.flops, step.gpu_hours = cost[step.name].flops, cost[step.name].gpu_hours
        step.disk_bytes = disk.get(step.name)
    return steps


def step_disk(cfg, plan: Plan) -> dict[str, float]:
    """Uncompressed bytes each step writes: instances (text, id, n_bytes, source), score tables
    (id, n_tokens, logprob), selected corpora (alpha of the pool, with a score), token caches
    (int32 per token, one per corpus and tokenizer, written by the first run that reads it), and
    a trained model's checkpoints (the latest keep_checkpoints, as Ray Train prunes them) and
    final weights."""
    from miniplm.training.train import TrainConfig

    disk = {}
    c = plan.corpus
    if c:
        names = [os.path.basename(f) for i in plan.inputs if i.key == "corpus.inputs" for f in i.files]
        names = names or ["docs-0.jsonl"]  # (the sample corpus's)
        id_bytes = sum(map(len, names)) / len(names) + len(str(int(c.documents / len(names)))) + 4  # name:row:k
        instances = c.text_bytes + c.instances * (id_bytes + 4 + 8 + 16)  # source: ~16 bytes
        pool = pool_share(cfg)
        selected = cfg.selection.alpha * pool * (instances + 8 * c.instances)
        heldout = sum(i.bytes for i in plan.inputs if i.key == "corpus.heldout")
        disk = {"sample corpus": sum(i.bytes for i in plan.inputs), "prepare corpus": instances,
                "prepare held-out set": heldout * c.text_bytes / max(1, c.stored_bytes),  # as the corpus inflates
                "split D_ref": instances, "score teacher": pool * c.instances * (id_bytes + SCORE_ROW),
                "score reference": pool * c.instances * (id_bytes + SCORE_ROW),
                "select refined": selected, "select random": selected}
    caches = set()
    keep = {f.name: f.default for f in dataclasses.fields(TrainConfig)}["keep_checkpoints"]
    for cost in plan.costs:
        if cost.data and (cost.data, cost.tokenizer) not in caches and cost.corpus_tokens is not None:
            caches.add((cost.data, cost.tokenizer))
            disk[cost.step] = cost.corpus_tokens * TOKEN_BYTES
        if cost.step.startswith("train "):
            kept = min(keep, math.ceil(cost.tokens / cfg.train.batch_tokens / cfg.train.checkpoint_every))
            disk[cost.step] = disk.get(cost.step, 0) + cost.weights * (WEIGHT_BYTES + kept * STATE_BYTES)
    return disk


def check_budgets(cfg, plan: Plan) -> None:
    """A student whose budget is more tokens than its corpus holds repeats the corpus."""
    for i, st in enumerate(cfg.students):
        cost = next((c for c in plan.costs if c.step == f"train student {st.name}"), None)
        if cost is None or not cost.corpus_tokens or cost.tokens <= cost.corpus_tokens:
            continue
        key = f"students[{i}].{'tokens' if st.tokens is not None else 'steps'}"
        plan.problem(key, f"{key}: {sci(cost.tokens)} tokens, but its corpus ({st.corpus}) holds "
                     f"~{sci(cost.corpus_tokens)}: the run reads it ~{sci(cost.tokens / cost.corpus_tokens)} "
                     "times over", fatal=False)


def check_cluster_paths(cfg, plan: Plan) -> None:
    """On a cluster of several nodes every node must see each local path (shared storage); the
    number of nodes is not checked here (that needs a connection to the cluster). A Hub snapshot
    is exempt (each node resolves it from its own cache), and so is the built-in teacher (in the
    package)."""
    paths = [("output", cfg.output)] + [(f"corpus.inputs[{i}]", p) for i, p in enumerate(cfg.corpus.inputs)]
    paths += [(f"corpus.heldout[{i}]", p) for i, p in enumerate(cfg.corpus.heldout)]
    for key, path in paths + list(plan.models.items()):
        if path != "sample" and io.is_local(path) and not hub.describe(path):
            plan.problem(key, f"{key}: {path} is a local path: on a cluster of more than one node it must be on "
                         "storage every node sees, or an s3:// / gs:// URL (plan does not contact the cluster "
                         "to count its nodes)", fatal=False)


# ---------------------------------------------------------------- output


def sci(x: float) -> str:
    """3.6e20, 1.2e6, 512: two significant digits, short exponents."""
    return re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", f"{x:.2g}")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def hours(h: float) -> str:
    return f"{h:,.0f}" if h >= 10 else sci(h)


def cell(value: float | None, fmt) -> str:
    return "" if value is None else fmt(value)


def wrapped(text: str, indent: str = "", hang: str = "    ") -> list[str]:
    """`text` as lines of at most WIDTH columns; a path or URL is never split."""
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent + hang,
                         break_long_words=False, break_on_hyphens=False)


def render(plan: Plan) -> str:
    """The plan as a readable report, at most WIDTH columns (a long path aside)."""
    lines = wrapped(f"miniplm plan: {plan.config}" + (f" -> {plan.output}" if plan.output else ""))
    if plan.inputs or plan.models:
        lines.append("\ninputs")
        for i in plan.inputs:
            what = f"{i.note}, {human_bytes(i.bytes)} of text" if i.note else (
                f"{len(i.files)} file(s), {human_bytes(i.bytes)}" + (" stored (compressed)" if i.compressed else "")
                + (f": {i.files[0]}{', ...' if len(i.files) > 1 else ''}" if i.files else ""))
            lines += wrapped(f"{i.key:26} {what}", "  ", " " * 27)
        lines += [f"  {key:26} {describe_model(path)}" for key, path in plan.models.items()]
    c = plan.corpus
    if c:
        lines.append("\ncorpus (estimated)")
        lines.append(f"  {human_bytes(c.text_bytes)} of text, ~{c.documents:,.0f} documents, "
                     f"~{c.instances:,.0f} instances")
        lines += wrapped(f"({c.note})", "  ")
        lines += [f"  {sci(tokens)} tokens with the tokenizer of {describe_model(path)}"
                  for path, tokens in c.tokens.items() if path != ASSUMED]
        if len(c.tokens) == 1:
            lines.append(f"  {sci(c.tokens[ASSUMED])} tokens with the tokenizer the run trains "
                         f"(at an assumed {BYTES_PER_TOKEN:g} bytes per token)")
    if plan.costs:
        lines.append("\nmodels (training FLOPs/token include an online KD teacher's forward)")
        lines.append(f"  {'step':30} {'model':28} {'matmul params':>14} {'context':>7} {'FLOPs/token':>11} "
                     f"{'tokens':>8}")
        for m in plan.costs:
            model = m.model if len(m.model) <= 28 else "..." + m.model[-25:]
            lines.append(f"  {m.step:30} {model:28} {m.params:>14,} {m.context:>7} {sci(m.flops_per_token):>11} "
                         f"{sci(m.tokens):>8}")
    if plan.steps:
        lines.append(f"\nsteps (GPU-hours at an achieved {plan.tflops:g} TFLOP/s per GPU; disk uncompressed)")
        lines.append(f"  {'step':30} {'status':7} {'FLOPs':>9} {'GPU-hours':>10} {'disk':>10}")
        for s in plan.steps:
            lines.append(f"  {s.name:30} {s.status:7} {cell(s.flops, sci):>9} {cell(s.gpu_hours, hours):>10} "
                         f"{cell(s.disk_bytes, human_bytes):>10}")
        run = [s for s in plan.steps if s.status == "runs"]
        lines.append(f"  {'total of the steps that run':38} {sci(sum(s.flops or 0 for s in run)):>9} "
                     f"{hours(sum(s.gpu_hours or 0 for s in run)):>10} "
                     f"{human_bytes(sum(s.disk_bytes or 0 for s in run)):>10}")
    for note in plan.notes:
        lines += [""] + wrapped(f"note: {note}")
    fatal = [p for p in plan.problems if p.fatal]
    lines.append(f"\nproblems: {len(fatal)} that would fail the run, {len(plan.problems) - len(fatal)} warning(s)")
    for p in plan.problems:
        message = p.message if p.message.startswith(p.key) else f"{p.key}: {p.message}"
        lines += wrapped(f"- {'error' if p.fatal else 'warning'}: {message}", "  ")
    return "\n".join(lines)


def to_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=2)
