"""run: the whole MiniPLM pipeline from one YAML file.

prepare -> split off D_ref -> tokenizer -> (train teacher / reference) -> score teacher ->
score reference -> select (refined, and random for the vanilla baseline) -> train each student
-> evaluate each -> report. Every step skips itself when its output already exists with
matching fingerprints, so adding a student to the YAML re-uses the score tables and trains
only that student. Each step prints whether it ran or was reused, and its time.
"""

from __future__ import annotations

import dataclasses
import os
import time

from miniplm import console, io
from miniplm.config import describe, field, to_dict
from miniplm.data.split import split_instances
from miniplm.demo import teacher as demo_teacher
from miniplm.demo.teacher import BUILTIN
from miniplm.models import PRESETS, is_tokenizer_dir
from miniplm.training.train import KDSpec

CORPUS_KINDS = ("refined", "random", "full")


@dataclasses.dataclass(kw_only=True)
class CorpusSpec:
    inputs: list[str] = field(["sample"], path=True, keywords=("sample",), help="corpus files/folders/globs, or `sample` (built-in)")
    heldout: list[str] = field([], path=True, help="held-out evaluation files (the sample corpus brings its own)")
    sample_bytes: int = field(1_000_000, help="size of the built-in sample corpus")
    max_chars: int = field(2000, help="split documents longer than this into instances")


@dataclasses.dataclass(kw_only=True)
class ModelRun:
    checkpoint: str | None = field(None, model=True, keywords=(BUILTIN,),
                                   help="an existing HF checkpoint, `builtin` (teacher: the demo's built-in one) "
                                        "or none (trained here)")
    preset: str = field("tiny", help="model preset when trained here")
    tokens: int = field(0, help="training budget in tokens when trained here")
    fraction: float = field(1.0, help="reference: fraction of the corpus held out as D_ref")
    seed: int = field(0, help="seed of the D_ref split / training")
    data: str = field("pool", help="teacher trained here: on `pool` (the instances it then scores) "
                                   "or on `d_ref` (held out from selection, as the reference is)")


@dataclasses.dataclass(kw_only=True)
class SelectionSpec:
    alpha: float = field(0.5, help="fraction of instances kept")
    method: str = field("difference", help="difference, teacher, random or sample")
    normalize: str = field("auto", help="token, byte, or auto (token when teacher and reference share a tokenizer)")
    temperature: float = field(1.0, help="sample method temperature")
    seed: int = field(0, help="seed of random/sample selection")


@dataclasses.dataclass(kw_only=True)
class StudentSpec:
    name: str = field(help="run name (folder under students/)")
    corpus: str = field("refined", help="refined (MiniPLM), random (vanilla, same size) or full")
    preset: str | None = field("tiny", help="model preset")
    config: str | None = field(None, path=True, help="HF config.json instead of a preset")
    tokenizer: str | None = field(None, model=True, help="tokenizer folder or Hub id (default: the pipeline's)")
    tokens: int | None = field(None, help="training budget in tokens (or give steps)")
    steps: int | None = field(None, help="training budget in steps of train.batch_tokens (or give tokens)")
    seed: int = field(0, help="init and data order seed")
    kd: KDSpec | None = field(None, help="online distillation: {teacher: teacher (the pipeline's) | PATH, "
                                         "weight, temperature}; the teacher must share the student's tokenizer")


@dataclasses.dataclass(kw_only=True)
class TrainDefaults:
    seq_len: int = field(128, help="sequence length")
    batch_tokens: int = field(4096, help="global batch in tokens")
    micro_batch: int = field(8, help="sequences per forward pass")
    lr: float = field(3e-3, help="peak learning rate")
    warmup_steps: int = field(10, help="warmup steps")
    eval_every: int = field(10, help="held-out eval every this many steps")
    checkpoint_every: int = field(50, help="checkpoint every this many steps")
    num_workers: int = field(1, help="Ray Train workers")
    cpus_per_worker: float = field(1.0, help="CPUs per worker")
    torch_threads: int | None = field(None, help="CPU threads torch uses per worker (default: cpus_per_worker)")
    use_gpu: bool = field(False, help="train on GPUs")


@dataclasses.dataclass(kw_only=True)
class PipelineConfig:
    output: str = field(path=True, help="run folder for every stage's output")
    corpus: CorpusSpec = dataclasses.field(default_factory=CorpusSpec)
    tokenizer: str | None = field(None, model=True, keywords=(BUILTIN,),
                                  help="tokenizer folder, `builtin` (the built-in teacher's) or none (trained on the pool)")
    vocab_size: int = field(2048, help="vocabulary of the tokenizer trained here")
    teacher: ModelRun = field(help="teacher: checkpoint or model to train")
    reference: ModelRun = field(help="reference: checkpoint or model to train on D_ref")
    selection: SelectionSpec = dataclasses.field(default_factory=SelectionSpec)
    students: list[StudentSpec] = field(help="students to train and compare")
    train: TrainDefaults = dataclasses.field(default_factory=TrainDefaults)
    score_workers: int = field(1, help="scoring actors")
    score_cpus: float = field(1.0, help="CPUs per scoring actor")
    device: str = field("auto", help="scoring device: cpu, cuda or auto")
    report: str = field("report", help="folder (under output) for the students' comparison")

    def __post_init__(self):
        if not io.is_local(self.output):
            raise ValueError(f"output: {self.output} is not a local folder. The pipeline keeps its "
                             "bookkeeping on a local or shared file system; every stage command "
                             "(prepare, score, select, train, eval) takes object-store URLs")
        if not 0 < self.selection.alpha <= 1:
            raise ValueError(f"selection.alpha must be in (0, 1], got {self.selection.alpha}")
        self._check_builtin()
        for role in ("teacher", "reference"):
            run: ModelRun = getattr(self, role)
            if run.checkpoint:
                if not io.exists(io.join(resolve_builtin(run.checkpoint), "config.json")):
                    raise ValueError(f"{role}.checkpoint: no HF checkpoint at {run.checkpoint}")
            else:
                _check_preset(f"{role}.preset", run.preset)
                if run.tokens <= 0:
                    raise ValueError(f"{role}.tokens: a model trained here needs a budget > 0")
        if self.teacher.data not in ("pool", "d_ref"):
            raise ValueError(f"teacher.data: {self.teacher.data!r} is not pool or d_ref")
        if self.teacher.data == "d_ref" and (self.teacher.checkpoint or self.reference.checkpoint):
            raise ValueError("teacher.data: d_ref needs both teacher and reference trained here")
        if not 0 < self.reference.fraction <= 1:
            raise ValueError(f"reference.fraction must be in (0, 1], got {self.reference.fraction}")
        if not self.students:
            raise ValueError("students: list at least one student")
        io.plain_name(self.report, "report")  # folders under output: never a path out of it
        names = [io.plain_name(s.name, f"students[{i}].name") for i, s in enumerate(self.students)]
        if len(set(names)) != len(names):
            raise ValueError(f"students: names must be unique, got {names}")
        for i, s in enumerate(self.students):
            if s.corpus not in CORPUS_KINDS:
                raise ValueError(f"students[{i}].corpus: {s.corpus!r} is not one of {', '.join(CORPUS_KINDS)}")
            if s.config is None:
                _check_preset(f"students[{i}].preset", s.preset)
            if (s.tokens is None) == (s.steps is None):
                raise ValueError(f"students[{i}]: give exactly one budget, tokens or steps")
            budget = "tokens" if s.tokens is not None else "steps"
            if getattr(s, budget) <= 0:
                raise ValueError(f"students[{i}].{budget}: the budget must be > 0")
            if not s.kd:
                continue
            teacher = resolve_builtin(self.teacher.checkpoint) if s.kd.teacher == "teacher" else s.kd.teacher
            tokenizer = s.tokenizer or resolve_builtin(self.tokenizer)
            if teacher and tokenizer:  # both exist already: a mismatch fails now, not hours in
                from miniplm.models import load_tokenizer_checked
                from miniplm.training.distill import check_teacher

                try:
                    check_teacher(teacher, load_tokenizer_checked(tokenizer), self.train.seq_len)
                except ValueError as err:
                    raise ValueError(f"students[{i}].{err}") from None
        if self.tokenizer and not is_tokenizer_dir(resolve_builtin(self.tokenizer)):
            raise ValueError(f"tokenizer: no tokenizer folder at {self.tokenizer}")

    def _check_builtin(self) -> None:
        """The built-in teacher scores with its own tokenizer and, on the sample corpus, was
        trained on the D_ref these split settings make: anything else fails now, not later."""
        if self.reference.checkpoint == BUILTIN:
            raise ValueError("reference.checkpoint: `builtin` is the demo's teacher; train the reference here")
        if self.teacher.checkpoint != BUILTIN:
            return
        if self.tokenizer != BUILTIN:
            raise ValueError("tokenizer: the built-in teacher needs its own tokenizer (tokenizer: builtin), "
                             "shared by the reference it is compared with")
        if self.corpus.inputs != ["sample"]:
            return  # another corpus never held the teacher's training text
        if self.reference.checkpoint:
            raise ValueError("reference.checkpoint: with the built-in teacher on the sample corpus the reference "
                             "is trained here, on the teacher's D_ref: without that split the pool would hold "
                             "text the teacher trained on")
        split = demo_teacher.split_settings()
        ours = {"fraction": self.reference.fraction, "seed": self.reference.seed, "max_chars": self.corpus.max_chars}
        differ = {k: v for k, v in ours.items() if v != split[k]}
        if differ:
            names = {"fraction": "reference.fraction", "seed": "reference.seed", "max_chars": "corpus.max_chars"}
            raise ValueError("teacher.checkpoint: the built-in teacher was trained on the sample corpus's D_ref "
                             f"split with fraction {split['fraction']}, seed {split['seed']} and max_chars "
                             f"{split['max_chars']}; " + ", ".join(f"{names[k]}={v}" for k, v in differ.items())
                             + " would put text it trained on into the pool")


def _check_preset(key: str, preset: str | None) -> None:
    if preset not in PRESETS:
        raise ValueError(f"{key}: unknown preset {preset!r} (known: {', '.join(PRESETS)})")


# ---------------------------------------------------------------- steps


class Steps:
    """Runs named steps, timing each and telling whether it ran or reused its output."""

    def __init__(self, names: list[str] = ()):
        self.names = list(names)  # every step of the run, in order, for "[3/15]"
        self.log: list[tuple[str, str, float]] = []

    def __call__(self, name: str, marker: str, fn, *args, **kwargs):
        before = _mtime(marker)
        started = time.time()
        place = f"[{self.names.index(name) + 1}/{len(self.names)}] " if name in self.names else ""
        print(f"{place}{name}", flush=True)
        result = fn(*args, **kwargs)
        status = "reused" if before is not None and _mtime(marker) == before else "ran"
        self.log.append((name, status, time.time() - started))
        return result

    def table(self) -> str:
        """One line (the full table with --verbose): how many steps ran or were reused, in how long."""
        ran = sum(status == "ran" for _, status, _ in self.log)
        seconds = sum(t for *_, t in self.log)
        if not console.verbose():
            return f"total: {len(self.log)} steps, {ran} ran, {len(self.log) - ran} reused, in {seconds:.1f}s"
        lines = [f"{'step':36} {'status':8} {'seconds':>8}"]
        lines += [f"{n:36} {s:8} {t:8.1f}" for n, s, t in self.log]
        lines.append(f"{'total':36} {'':8} {sum(t for *_, t in self.log):8.1f}")
        return "\n".join(lines)


def _mtime(path: str) -> float | None:
    return os.path.getmtime(path) if os.path.exists(path) else None


# ---------------------------------------------------------------- the pipeline


def step_markers(cfg: PipelineConfig) -> dict[str, str]:
    """Every step this config makes the pipeline run, in order, each with the file whose presence
    marks its output finished: the steps below are given these markers, and `miniplm plan` reads
    the same ones to tell which steps a run would reuse."""
    p = lambda *names: os.path.join(cfg.output, *names)  # noqa: E731
    steps = {}
    if cfg.corpus.inputs == ["sample"]:
        steps["sample corpus"] = p("sample", io.MANIFEST)
    steps["prepare corpus"] = p("instances", io.MANIFEST)
    steps["prepare held-out set"] = p("heldout", io.MANIFEST)
    if not cfg.reference.checkpoint:
        steps["split D_ref"] = p("pool", io.MANIFEST)
    if not cfg.tokenizer:
        steps["train tokenizer"] = p("tokenizer", io.MANIFEST)
    for role in ("teacher", "reference"):
        if not getattr(cfg, role).checkpoint:
            steps[f"train {role}"] = p(role, "_done.json")
    for role in ("teacher", "reference"):
        steps[f"score {role}"] = p("scores", role, io.MANIFEST)
    for kind in ("refined", "random"):
        if any(st.corpus == kind for st in cfg.students):
            steps[f"select {kind}"] = p(kind, io.MANIFEST)
    for st in cfg.students:
        steps[f"train student {st.name}"] = p("students", st.name, "_done.json")
        steps[f"eval student {st.name}"] = p("students", st.name, "eval.json")
    steps["report"] = p(cfg.report, "report.json")
    if cfg.corpus.inputs == ["sample"]:  # the demo's corpus: every set fits in memory (evalsets)
        steps["eval students per source"] = p(cfg.report, "eval_sets.json")
    return steps


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run (or resume) the pipeline into `cfg.output`, which this run holds until it ends."""
    console.detail(describe(cfg))
    io.check_made_by(cfg.output, "run", marker="pipeline.json")
    with io.hold(cfg.output, "run"):
        return _run_into(cfg)


def _run_into(cfg: PipelineConfig) -> dict:
    """Every step of the pipeline in the (held) run folder."""
    from miniplm.evaluation.evaluate import EvalConfig
    from miniplm.evaluation.report import ReportConfig, run_report
    from miniplm.runtime import init_ray
    from miniplm.scoring.score import ScoreConfig, run_score
    from miniplm.selection.select import SelectConfig, run_select

    out = cfg.output
    io.write_json(os.path.join(out, "pipeline.json"), to_dict(cfg))
    init_ray()
    marker = step_markers(cfg)
    step = Steps(list(marker))
    p = lambda *names: os.path.join(out, *names)  # noqa: E731

    data = prepare_data(cfg, step)
    pool, tokenizer = data["pool"], data["tokenizer"]
    models = {role: train_model(cfg, step, role, data) for role in ("teacher", "reference")}

    for role in ("teacher", "reference"):
        step(f"score {role}", marker[f"score {role}"], run_score,
             ScoreConfig(instances=pool, model=models[role], output=p("scores", role),
                         workers=cfg.score_workers, cpus_per_worker=cfg.score_cpus, device=cfg.device))
    s = cfg.selection
    corpora = {"full": pool}
    for kind, method in (("refined", s.method), ("random", "random")):
        if any(st.corpus == kind for st in cfg.students):
            step(f"select {kind}", marker[f"select {kind}"], run_select,
                 SelectConfig(instances=pool, teacher=p("scores", "teacher"), reference=p("scores", "reference"),
                              output=p(kind), alpha=s.alpha, method=method, normalize=s.normalize,
                              temperature=s.temperature, seed=s.seed))
            corpora[kind] = p(kind)

    for st in cfg.students:
        run_dir = p("students", st.name)
        kd = st.kd
        if kd and kd.teacher == "teacher":
            kd = dataclasses.replace(kd, teacher=models["teacher"])
        train_cfg = _train_config(cfg, run_dir, corpora[st.corpus], st.tokenizer or tokenizer,
                                  st.preset, st.config, st.tokens, st.seed, eval_data=p("heldout"),
                                  steps=st.steps, kd=kd)
        step(f"train student {st.name}", marker[f"train student {st.name}"], _train, train_cfg)
        step(f"eval student {st.name}", marker[f"eval student {st.name}"], _eval_once,
             EvalConfig(model=os.path.join(run_dir, "final"), data=p("heldout"),
                        output=os.path.join(run_dir, "eval.json"), cpus_per_worker=cfg.score_cpus,
                        device=cfg.device))

    baseline = next((st.name for st in cfg.students if st.corpus != "refined"), cfg.students[0].name)
    treatment = next((st.name for st in cfg.students if st.corpus == "refined" and st.name != baseline), None)
    summary = step("report", marker["report"], run_report,
                   ReportConfig(runs=[p("students", st.name) for st in cfg.students], output=p(cfg.report),
                                baseline=baseline, treatment=treatment))
    by_set = None
    if "eval students per source" in marker:
        by_set = step("eval students per source", marker["eval students per source"], eval_per_source, cfg)
    if os.path.exists(p("refined", "report.json")):
        print(kept_per_source(io.read_json(p("refined", "report.json"))))
    if by_set:
        print(per_source_table(by_set))
    print(step.table())
    return {"summary": summary, "steps": step.log}


def prepare_data(cfg: PipelineConfig, step: Steps) -> dict[str, str]:
    """The corpus steps: sample corpus, instances, held-out set, D_ref split, tokenizer.
    Returns the paths the model steps use."""
    from miniplm.data.prepare import PrepareConfig, run_prepare
    from miniplm.data.tokenizer import TokenizerConfig, run_train_tokenizer
    from miniplm.demo.sample_corpus import write_sample_corpus

    p = lambda *names: os.path.join(cfg.output, *names)  # noqa: E731
    marker = step_markers(cfg)
    inputs, heldout = cfg.corpus.inputs, cfg.corpus.heldout
    if inputs == ["sample"]:
        if not os.path.exists(marker["sample corpus"]):
            step("sample corpus", marker["sample corpus"], write_sample_corpus,
                 p("sample"), max_bytes=cfg.corpus.sample_bytes)
        made_with = io.read_json(p("sample", io.MANIFEST)).get("max_bytes")
        if made_with != cfg.corpus.sample_bytes:  # another size is another corpus: never mix them
            raise ValueError(f"corpus.sample_bytes: {cfg.output} holds a sample corpus of max_bytes {made_with}, "
                             f"not {cfg.corpus.sample_bytes}. Remove the run folder, or give the run "
                             "(`miniplm demo --output`, the YAML's `output`) another one.")
        inputs, heldout = [p("sample", "train")], heldout or [p("sample", "heldout")]
    if cfg.teacher.checkpoint == BUILTIN:
        sample = p("sample", io.MANIFEST) if cfg.corpus.inputs == ["sample"] else None
        print(demo_teacher.describe(io.read_json(sample)["fingerprint"] if sample else None))
    if not heldout:
        raise ValueError("corpus.heldout: give held-out evaluation files (or use the sample corpus)")
    step("prepare corpus", marker["prepare corpus"], run_prepare,
         PrepareConfig(inputs=inputs, output=p("instances"), max_chars=cfg.corpus.max_chars))
    step("prepare held-out set", marker["prepare held-out set"], run_prepare,
         PrepareConfig(inputs=heldout, output=p("heldout"), max_chars=cfg.corpus.max_chars))

    # D_ref, held out from selection, trains the reference (when it is trained here)
    pool = p("instances")
    if not cfg.reference.checkpoint:
        pool = p("pool")
        step("split D_ref", marker["split D_ref"], split_instances, p("instances"),
             cfg.reference.fraction, cfg.reference.seed, p("d_ref"), p("pool"))

    tokenizer = resolve_builtin(cfg.tokenizer) or p("tokenizer")
    if not cfg.tokenizer:  # reused when trained on the same pool with the same vocab_size
        step("train tokenizer", marker["train tokenizer"], run_train_tokenizer,
             TokenizerConfig(instances=pool, output=p("tokenizer"), vocab_size=cfg.vocab_size))
    return {"pool": pool, "d_ref": p("d_ref"), "heldout": p("heldout"), "tokenizer": tokenizer}


def train_model(cfg: PipelineConfig, step: Steps, role: str, data: dict[str, str]) -> str:
    """The teacher's or the reference's checkpoint: given, built in, or trained here."""
    run: ModelRun = getattr(cfg, role)
    if run.checkpoint:
        return resolve_builtin(run.checkpoint)
    train_data = data["pool"] if role == "teacher" and cfg.teacher.data == "pool" else data["d_ref"]
    out = os.path.join(cfg.output, role)
    train_cfg = _train_config(cfg, out, train_data, data["tokenizer"], run.preset, None, run.tokens, run.seed,
                              eval_data=data["heldout"])
    step(f"train {role}", step_markers(cfg)[f"train {role}"], _train, train_cfg)
    return os.path.join(out, "final")


def resolve_builtin(path: str | None) -> str | None:
    """`builtin` names the demo's built-in teacher (and its tokenizer); any other path is itself.
    The folder is inside the installed package: on a multi-node cluster, where nodes may install
    it elsewhere, copy it to shared storage and name that path instead."""
    return demo_teacher.verified() if path == BUILTIN else path


def eval_per_source(cfg: PipelineConfig) -> dict:
    """Each student's bits per byte on every set of `miniplm.evaluation.evalsets` (held-out split, a D_ref
    slice per source, outside prose), as the claims benchmark measures them; the summary file is
    rewritten only when a figure changed."""
    from miniplm.evaluation.evalsets import EVAL_BYTES, build_eval_sets, evaluate_on_sets

    sets = build_eval_sets(cfg.output, EVAL_BYTES)
    runs = {st.name: evaluate_on_sets(os.path.join(cfg.output, "students", st.name, "final"), sets,
                                      os.path.join(cfg.output, "students", st.name, "eval_sets.json"))
            for st in cfg.students}
    summary = {"sets": [{"name": s.name, "texts": len(s.texts), "bytes": s.bytes, "dropped": s.dropped,
                         "origin": s.origin} for s in sets], "runs": runs}
    path = os.path.join(cfg.output, cfg.report, "eval_sets.json")
    if not os.path.exists(path) or io.read_json(path) != summary:
        io.write_json(path, summary)
    return summary


def per_source_table(summary: dict) -> str:
    names = [s["name"] for s in summary["sets"]]
    lines = ["Bits per byte on each evaluation set (lower is better; near-duplicates of the pool dropped)",
             f"  {'run':14}" + "".join(f"{n:>15}" for n in names)]
    lines += [f"  {run:14}" + "".join(f"{bits[n]:15.4f}" for n in names) for run, bits in summary["runs"].items()]
    lines.append(f"  {'texts':14}" + "".join(f"{s['texts']:15}" for s in summary["sets"]))
    return "\n".join(lines)


def kept_per_source(report: dict) -> str:
    """What the refined corpus kept of each source: the selection at a glance."""
    lines = [f"Refined corpus ({report['method']}, alpha {report['alpha']}): kept per source"]
    for source, s in sorted(report["per_source"].items()):
        total = s["kept"] + s["dropped"]
        lines.append(f"  {source:12} {s['kept']:>6} of {total:<6} {s['kept'] / max(total, 1):6.1%}")
    return "\n".join(lines)


def _train(train_cfg):
    from miniplm.training.train import run_train

    return run_train(train_cfg)


def _eval_once(eval_cfg):
    """Evaluate unless this checkpoint's eval.json is already there."""
    from miniplm.evaluation.evaluate import run_eval
    from miniplm.models import model_fingerprint

    if os.path.exists(eval_cfg.output):
        previous = io.read_json(eval_cfg.output)
        if previous["provenance"]["model_fingerprint"] == model_fingerprint(eval_cfg.model):
            print(f"eval: {eval_cfg.output} is up to date; nothing to do")
            return previous
    return run_eval(eval_cfg)


def _train_config(cfg: PipelineConfig, output: str, data: str, tokenizer: str, preset, config,
                  tokens: int | None, seed: int, eval_data: str, steps: int | None = None, kd=None):
    from miniplm.training.train import DataSpec, EvalSpec, ModelSpec, OptimSpec, TrainConfig

    t = cfg.train
    return TrainConfig(
        output=output, model=ModelSpec(preset=preset, config=config, tokenizer=tokenizer),
        data=DataSpec(path=data, seq_len=t.seq_len, seed=seed),
        optim=OptimSpec(lr=t.lr, warmup_steps=t.warmup_steps),
        eval=EvalSpec(data=eval_data, every=t.eval_every),
        tokens=tokens, steps=steps, batch_tokens=t.batch_tokens, micro_batch=t.micro_batch,
        num_workers=t.num_workers, cpus_per_worker=t.cpus_per_worker, torch_threads=t.torch_threads,
        use_gpu=t.use_gpu, seed=seed, checkpoint_every=t.checkpoint_every, kd=kd,
        token_cache=os.path.join(cfg.output, "tokens"))  # one cache per content for every run here


# ---------------------------------------------------------------- configs


DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "demo.yaml")
# the smoke version of the demo (a few minutes on 2 CPUs): a smaller corpus and budgets
QUICK = ["corpus.sample_bytes=200000", "reference.tokens=20000",
         "students[0].tokens=40000", "students[1].tokens=40000", "train.eval_every=5"]


def load_pipeline(path: str, overrides: list[str] | None = None) -> PipelineConfig:
    from miniplm.config import load

    return load(PipelineConfig, path, overrides or [])


def saved_pipeline(output: str) -> PipelineConfig:
    """The config a finished `run`/`demo` recorded in its folder (pipeline.json)."""
    from miniplm.config import build

    path = os.path.join(output, "pipeline.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{output}: no pipeline.json; run `miniplm demo` (or `miniplm run`) first")
    return build(PipelineConfig, io.read_json(path))


# a vanilla-KD student at about the total FLOPs of the demo's 400K-token students: the tiny
# student's 1.62 MFLOPs per token trained plus the mini teacher's 2.49 MFLOPs per token forward
KD_STUDENT = "students[2]={name: vanilla-kd, corpus: random, preset: tiny, tokens: %d, kd: {teacher: teacher}}"


def demo_config(output: str, quick: bool = False, with_kd: bool = False) -> PipelineConfig:
    overrides = [f"output={output}"] + (QUICK if quick else [])
    if with_kd:  # off by default: it adds the teacher's forward to every step of one more student
        overrides.append(KD_STUDENT % (16000 if quick else 160000))
    return load_pipeline(DEMO_CONFIG, overrides)
