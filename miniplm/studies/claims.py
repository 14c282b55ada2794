"""The paper's claims in miniature, each with seeds (jobs/bench_claims.py).

On a finished demo (or pipeline) run, whose corpus, score tables and selections are reused, every
arm below is a student trained for each seed (model initialisation and data order); students
already trained are reused. Each is evaluated in bits per byte on the sets of
`miniplm.evaluation.evalsets`: the run's held-out split, one D_ref slice per source, and outside prose.

  C1  MiniPLM < vanilla (the whole pool, plain LM loss), equal training tokens
  C2  MiniPLM < selection by teacher log-prob alone (same alpha), equal tokens
  C3  MiniPLM < vanilla KD (whole pool, online teacher, 0.5 LM + 0.5 KL), equal training FLOPs
      with the teacher's forward counted (so the KD student takes fewer steps)
  C4  MiniPLM + KD vs MiniPLM alone, equal training FLOPs (the paper: better at 1.2B, worse
      at 200M; the sign measured here is reported as it is)
  C5  a student of another family and tokenizer (Qwen2-style, a BPE of its own trained on the
      pool) against the Llama-style teacher: MiniPLM-cross < vanilla-cross
  C6  C1 at three student sizes: the compute-saving factor per size, and loss against training
      FLOPs fitted per arm in its log-linear form, log L = log a - b log C
  C7  data-constrained: students repeat the refined half (about half the pool's unique tokens);
      vanilla on a quarter, a half and the whole pool: how much unique data vanilla needs to
      match MiniPLM (interpolated in log data)

A claim's gain per seed is baseline - treatment in bits per byte (positive: the claim's side is
lower). Verdict: `holds` when the gain is positive in every seed and its mean exceeds the
seed-to-seed spread (the larger standard deviation of the two arms), `holds on average` when
the mean gain is positive, else `does not hold`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics

from miniplm import io
from miniplm.evaluation.evalsets import EVAL_BYTES, pool_folder

SIZES = {  # C6: llama students of three widths (tiny is the demo's student)
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4),
    "mid": dict(hidden_size=96, intermediate_size=288, num_hidden_layers=3, num_attention_heads=4),
    "mini": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
}
CROSS_VOCAB = 3072  # C5's own tokenizer: another vocabulary than the teacher's 2048
ALL_CLAIMS = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
SCALING = ("C6", "C7")  # fewer seeds: 3 suffice (the budget)


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    corpus: str          # pool, refined, teacher, half, quarter
    size: str = "tiny"   # SIZES key
    family: str = "llama"  # llama (the teacher's tokenizer) or qwen2 (its own tokenizer)
    kd: bool = False     # online KD from the teacher, at the FLOPs of the LM-only arms


@dataclasses.dataclass(frozen=True)
class Claim:
    key: str
    text: str
    baseline: str
    treatment: str


ARMS = {a.name: a for a in [
    Arm("vanilla", "pool"), Arm("miniplm", "refined"), Arm("teacher-only", "teacher"),
    Arm("vanilla-kd", "pool", kd=True), Arm("miniplm-kd", "refined", kd=True),
    Arm("vanilla-cross", "pool", family="qwen2"), Arm("miniplm-cross", "refined", family="qwen2"),
    Arm("vanilla-mid", "pool", size="mid"), Arm("miniplm-mid", "refined", size="mid"),
    Arm("vanilla-mini", "pool", size="mini"), Arm("miniplm-mini", "refined", size="mini"),
    Arm("vanilla-half", "half"), Arm("vanilla-quarter", "quarter"),
]}

CLAIMS = [
    Claim("C1", "MiniPLM < vanilla (equal tokens)", "vanilla", "miniplm"),
    Claim("C2", "MiniPLM < teacher-only selection (equal tokens)", "teacher-only", "miniplm"),
    Claim("C3", "MiniPLM < vanilla KD (equal FLOPs)", "vanilla-kd", "miniplm"),
    Claim("C4", "MiniPLM+KD < MiniPLM (equal FLOPs)", "miniplm", "miniplm-kd"),
    Claim("C5", "MiniPLM-cross < vanilla-cross (Qwen2 student, own tokenizer)", "vanilla-cross", "miniplm-cross"),
    Claim("C6", "MiniPLM < vanilla, tiny student", "vanilla", "miniplm"),
    Claim("C6", "MiniPLM < vanilla, mid student", "vanilla-mid", "miniplm-mid"),
    Claim("C6", "MiniPLM < vanilla, mini student", "vanilla-mini", "miniplm-mini"),
    Claim("C7", "MiniPLM (refined half, repeated) < vanilla on a quarter of the pool", "vanilla-quarter", "miniplm"),
    Claim("C7", "MiniPLM (refined half, repeated) < vanilla on a random half", "vanilla-half", "miniplm"),
    Claim("C7", "MiniPLM (refined half, repeated) < vanilla on the whole pool", "vanilla", "miniplm"),
]
# unique data of each C7 arm's corpus, in refined corpora (at the demo's alpha 0.5: the pool is 2)
C7_DATA = {"vanilla-quarter": 0.5, "vanilla-half": 1.0, "vanilla": None}  # None: 1 / alpha


@dataclasses.dataclass(kw_only=True)
class StudyConfig:
    run: str                      # a finished demo / pipeline run folder
    seeds: list[int]              # C1-C5
    scaling_seeds: list[int]      # C6-C7
    claims: list[str]
    tokens: int = 400_000         # per LM-only student; KD students get the same FLOPs
    eval_bytes: int = EVAL_BYTES  # per evaluation set: the demo's
    batch_tokens: int | None = None  # default: the run's own
    eval_every: int | None = None    # held-out curve points every this many steps (default: the run's)
    alpha: float = 0.5            # the run's selection alpha (set from its pipeline.json)

    def __post_init__(self):
        unknown = sorted(set(self.claims) - set(ALL_CLAIMS))
        if unknown:
            raise ValueError(f"--claims: unknown {', '.join(unknown)} (known: {', '.join(ALL_CLAIMS)})")

    def seeds_of(self, claim: str) -> list[int]:
        return self.scaling_seeds if claim in SCALING else self.seeds


# ---------------------------------------------------------------- what each arm trains on


def arm_seeds(cfg: StudyConfig) -> dict[str, list[int]]:
    """Every arm the chosen claims need, with the seeds it needs (the most any claim asks)."""
    wanted: dict[str, set[int]] = {}
    for claim in CLAIMS:
        if claim.key in cfg.claims:
            for arm in (claim.baseline, claim.treatment):
                wanted.setdefault(arm, set()).update(cfg.seeds_of(claim.key))
    return {arm: sorted(seeds) for arm, seeds in wanted.items()}


def corpora(pcfg, root: str, names: set[str]) -> dict[str, str]:
    """The instances folder of each corpus: the run's own, or a selection made here (which the
    select stage reuses while its tables and settings are unchanged)."""
    from miniplm.selection.select import SelectConfig, run_select

    run, s = pcfg.output, pcfg.selection
    paths = {"pool": pool_folder(run), "refined": os.path.join(run, "refined")}
    if os.path.exists(os.path.join(run, "random", io.MANIFEST)):
        paths["half"] = os.path.join(run, "random")  # the run's own vanilla corpus: the refined one's size
    made_here = {"teacher": ("teacher", s.alpha), "half": ("random", s.alpha), "quarter": ("random", s.alpha / 2)}
    for name in sorted(names & made_here.keys() - paths.keys()):
        method, alpha = made_here[name]
        paths[name] = os.path.join(root, "corpora", name)
        run_select(SelectConfig(instances=paths["pool"], teacher=os.path.join(run, "scores", "teacher"),
                                reference=os.path.join(run, "scores", "reference"), output=paths[name],
                                alpha=alpha, method=method, normalize=s.normalize, seed=s.seed))
    return paths


def cross_tokenizer(pcfg, root: str) -> str:
    from miniplm.data.tokenizer import TokenizerConfig, run_train_tokenizer

    out = os.path.join(root, "cross-tokenizer")
    return run_train_tokenizer(TokenizerConfig(instances=pool_folder(pcfg.output), output=out,
                                               vocab_size=CROSS_VOCAB))


def model_file(root: str, arm: Arm, tokenizer: str, seq_len: int) -> str:
    """An HF config.json for the arm's shape and family, with its tokenizer's vocabulary."""
    from transformers import AutoConfig

    from miniplm.models import load_tokenizer

    tok = load_tokenizer(tokenizer)
    config = AutoConfig.for_model(arm.family, vocab_size=len(tok), tie_word_embeddings=True,
                                  num_key_value_heads=SIZES[arm.size]["num_attention_heads"],
                                  max_position_embeddings=max(1024, seq_len), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                  **SIZES[arm.size])
    path = os.path.join(root, "models", f"{arm.family}-{arm.size}-{len(tok)}.json")
    io.write_json(path, config.to_dict())
    return path


def flops_per_token(config_path: str, tokenizer: str, seq_len: int, teacher: str | None) -> tuple[int, int]:
    """(student training, teacher forward) FLOPs per token, by the training loop's own count, on
    models built on the meta device from their configs (no weights allocated or read)."""
    from transformers import AutoConfig

    from miniplm.models import ModelSpec, load_tokenizer, model_config
    from miniplm.pipeline.plan import meta_model
    from miniplm.training.flops import flops_per_token as count

    student = meta_model(model_config(ModelSpec(preset=None, config=config_path, tokenizer=tokenizer),
                                      load_tokenizer(tokenizer), seq_len))
    t = count(meta_model(AutoConfig.from_pretrained(io.local_copy(teacher))), seq_len, training=False) if teacher else 0
    return count(student, seq_len, training=True), t


# ---------------------------------------------------------------- the study


def run_study(cfg: StudyConfig) -> dict:
    """Train (or reuse) every arm for every seed, evaluate, and summarise; holds the run folder."""
    from miniplm.pipeline.run import saved_pipeline

    pcfg = saved_pipeline(cfg.run)
    cfg = dataclasses.replace(cfg, alpha=pcfg.selection.alpha)
    train = {k: v for k, v in (("batch_tokens", cfg.batch_tokens), ("eval_every", cfg.eval_every)) if v}
    pcfg = dataclasses.replace(pcfg, train=dataclasses.replace(pcfg.train, **train))
    io.check_made_by(cfg.run, "run", marker="pipeline.json")
    with io.hold(cfg.run, "run"):
        return _study(cfg, pcfg)


def _study(cfg: StudyConfig, pcfg) -> dict:
    from miniplm.evaluation.evalsets import build_eval_sets
    from miniplm.pipeline.run import _train_config, resolve_builtin
    from miniplm.runtime import init_ray
    from miniplm.training.train import KDSpec, run_train

    root = os.path.join(cfg.run, "claims")
    init_ray()
    seeds = arm_seeds(cfg)
    arms = {name: ARMS[name] for name in seeds}
    paths = corpora(pcfg, root, {a.corpus for a in arms.values()})
    teacher = resolve_builtin(pcfg.teacher.checkpoint) or os.path.join(cfg.run, "teacher", "final")
    tokenizers = {"llama": resolve_builtin(pcfg.tokenizer) or os.path.join(cfg.run, "tokenizer")}
    if any(a.family == "qwen2" for a in arms.values()):
        tokenizers["qwen2"] = cross_tokenizer(pcfg, root)
    seq_len, batch = pcfg.train.seq_len, pcfg.train.batch_tokens
    lm_steps = max(1, round(cfg.tokens / batch))

    sets = build_eval_sets(cfg.run, cfg.eval_bytes)
    print("evaluation sets (bits per byte; near-duplicates of the pool dropped):")
    for s in sets:
        print(f"  {s.name:14} {len(s.texts):4} texts {s.bytes:>8,} bytes  {s.dropped} dropped  ({s.origin})")

    results = {}
    for name, arm in arms.items():
        tokenizer = tokenizers[arm.family]
        config = model_file(root, arm, tokenizer, seq_len)
        steps = lm_steps
        if arm.kd:  # the LM-only arm's FLOPs, spent on the student's training and the teacher's forward
            s, t = flops_per_token(config, tokenizer, seq_len, teacher)
            steps = max(1, round(lm_steps * s / (s + t)))
        for seed in seeds[name]:
            out = os.path.join(root, "students", f"{name}-{cfg.tokens}-s{seed}")
            print(f"\n== {name}, seed {seed}: {steps} steps of {batch} tokens -> {out}", flush=True)
            train_cfg = _train_config(pcfg, out, paths[arm.corpus], tokenizer, None, config, None, seed,
                                      eval_data=os.path.join(cfg.run, "heldout"), steps=steps,
                                      kd=KDSpec(teacher=teacher) if arm.kd else None)
            run_train(train_cfg)
            results[(name, seed)] = evaluate_student(out, sets)
    summary = summarise(cfg, arms, seeds, results, sets)
    write_outputs(os.path.join(root, f"report-{cfg.tokens}"), summary)  # one per budget studied
    return summary


def evaluate_student(run_dir: str, sets) -> dict:
    """Bits per byte on every set (cached beside the run), the training FLOPs, steps and the
    held-out curve."""
    from miniplm.evaluation.evalsets import evaluate_on_sets
    from miniplm.training.loop import load_metrics

    bits = evaluate_on_sets(os.path.join(run_dir, "final"), sets, os.path.join(run_dir, "claims_eval.json"))
    rows = load_metrics(os.path.join(run_dir, "metrics.jsonl"))
    last = rows[-1]
    return {"bits_per_byte": bits, "flops": last["flops"], "steps": last["step"], "tokens": last["tokens"],
            "curve": [(r["flops"], r["eval_loss"]) for r in rows if "eval_loss" in r]}


# ---------------------------------------------------------------- the summary


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(base: list[float], treat: list[float]) -> dict:
    gains = [b - t for b, t in zip(base, treat)]
    mean, sd = _mean_sd(gains)
    spread = max(_mean_sd(base)[1], _mean_sd(treat)[1])
    held = sum(g > 0 for g in gains)
    if held == len(gains) and mean > spread:
        word = "holds"
    elif mean > 0:
        word = "holds on average"
    else:
        word = "does not hold"
    return {"gains": gains, "mean": mean, "sd": sd, "spread": spread, "held": held, "n": len(gains),
            "verdict": word}


def summarise(cfg: StudyConfig, arms, seeds, results, sets) -> dict:
    from miniplm.evaluation.report import compute_saving_factor

    names = [s.name for s in sets]
    arm_rows = {}
    for name in arms:
        runs = [results[(name, seed)] for seed in seeds[name]]
        arm_rows[name] = {"seeds": seeds[name], "flops": statistics.fmean(r["flops"] for r in runs),
                          "steps": runs[0]["steps"], "tokens": runs[0]["tokens"],
                          "bits_per_byte": {n: [r["bits_per_byte"][n] for r in runs] for n in names}}
    claims = []
    for claim in CLAIMS:
        if claim.key not in cfg.claims:
            continue
        used = cfg.seeds_of(claim.key)
        per_set = {}
        for n in names:
            per_set[n] = verdict(seed_values(arm_rows[claim.baseline], n, used),
                                 seed_values(arm_rows[claim.treatment], n, used))
        entry = {"claim": claim.key, "text": claim.text, "baseline": claim.baseline, "treatment": claim.treatment,
                 "seeds": used, "per_set": per_set,
                 "flops_ratio": arm_rows[claim.treatment]["flops"] / arm_rows[claim.baseline]["flops"]}
        if claim.key == "C6":
            entry["saving"] = [compute_saving_factor(*(as_curve(a, results[(a, s)]["curve"])
                                                       for a in (claim.baseline, claim.treatment)))
                               for s in used]
        claims.append(entry)
    summary = {"run": cfg.run, "tokens": cfg.tokens, "claims_run": cfg.claims, "sets": [
        {"name": s.name, "texts": len(s.texts), "bytes": s.bytes, "dropped": s.dropped, "origin": s.origin} for s in sets],
        "arms": arm_rows, "claims": claims}
    if "C6" in cfg.claims:
        summary["scaling_fit"] = scaling_fit(arm_rows, names, cfg.scaling_seeds)
    if "C7" in cfg.claims:
        summary["data_needed"] = data_needed(arm_rows, names, cfg.scaling_seeds, cfg.alpha)
    return summary


def as_curve(name: str, points: list[tuple[float, float]]):
    """A run's periodic held-out evaluations as report's Curve (FLOPs, loss per token)."""
    import numpy as np

    from miniplm.evaluation.report import Curve

    flops, loss = zip(*points)
    return Curve(name, np.array(flops, dtype=float), np.array(loss, dtype=float))


def seed_values(row: dict, set_name: str, seeds: list[int]) -> list[float]:
    by_seed = dict(zip(row["seeds"], row["bits_per_byte"][set_name]))
    return [by_seed[s] for s in seeds]


def scaling_fit(arm_rows: dict, names: list[str], seeds: list[int]) -> dict:
    """Per arm and set: log L = log a - b log C over the three sizes' seed-mean final points."""
    import numpy as np

    fits = {}
    for arm_prefix in ("vanilla", "miniplm"):
        arms = [arm_prefix if size == "tiny" else f"{arm_prefix}-{size}" for size in SIZES]
        flops = np.log([arm_rows[a]["flops"] for a in arms])
        for n in names:
            loss = np.log([statistics.fmean(seed_values(arm_rows[a], n, seeds)) for a in arms])
            slope, intercept = np.polyfit(flops, loss, 1)
            fits.setdefault(arm_prefix, {})[n] = {"a": float(math.exp(intercept)), "b": float(-slope)}
    return fits


def data_needed(arm_rows: dict, names: list[str], seeds: list[int], alpha: float) -> dict:
    """Per set: how many refined halves of unique data vanilla needs to reach MiniPLM's loss,
    interpolated linearly in log data between the C7 arms; None when outside their range."""
    out = {}
    for n in names:
        miniplm = statistics.fmean(seed_values(arm_rows["miniplm"], n, seeds))
        points = sorted((C7_DATA[a] or 1 / alpha, statistics.fmean(seed_values(arm_rows[a], n, seeds)))
                        for a in C7_DATA)
        needed = None
        for (d0, l0), (d1, l1) in zip(points, points[1:]):
            if (l0 - miniplm) * (l1 - miniplm) <= 0 and l0 != l1:
                w = (l0 - miniplm) / (l0 - l1)
                needed = math.exp(math.log(d0) + w * (math.log(d1) - math.log(d0)))
                break
        out[n] = {"points": points, "miniplm": miniplm, "needed": needed,
                  "beyond": None if needed is not None else ("above" if points[-1][1] > miniplm else "below")}
    return out


# ---------------------------------------------------------------- printing


def tables(summary: dict) -> str:
    names = [s["name"] for s in summary["sets"]]
    lines = ["Held-out bits per byte, mean ± sd over seeds (lower is better)", "",
             "| arm | seeds | steps | training FLOPs | " + " | ".join(names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for arm, row in summary["arms"].items():
        cells = [f"{_mean_sd(row['bits_per_byte'][n])[0]:.4f} ± {_mean_sd(row['bits_per_byte'][n])[1]:.4f}"
                 for n in names]
        lines.append(f"| {arm} | {len(row['seeds'])} | {row['steps']} | {row['flops']:.3e} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (bits per byte on each set, in the order above)", ""]
    for arm, row in summary["arms"].items():
        for k, seed in enumerate(row["seeds"]):
            lines.append(f"  {arm:16} s{seed}  " + "  ".join(f"{row['bits_per_byte'][n][k]:.4f}" for n in names))
    lines += ["", "Claims: gain = baseline - treatment (bits per byte; positive: the claim's side is lower)", "",
              "| claim | | FLOPs ratio | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for c in summary["claims"]:
        cells = [f"{v['mean']:+.4f} ± {v['sd']:.4f} ({v['held']}/{v['n']}) {v['verdict']}"
                 for v in (c["per_set"][n] for n in names)]
        lines.append(f"| {c['claim']} | {c['text']} | {c['flops_ratio']:.3f} | " + " | ".join(cells) + " |")
    for c in summary["claims"]:
        if "saving" in c:
            got = [f"{x:.2f}x" if x else "not reached" for x in c["saving"]]
            lines.append(f"C6 compute-saving factor ({c['text'].split(', ')[-1]}, held-out curve): {', '.join(got)}")
    if "scaling_fit" in summary:
        for arm, per_set in summary["scaling_fit"].items():
            lines.append(f"C6 fit log L = log a - b log C, {arm}: " + ", ".join(
                f"{n} b={f['b']:.4f}" for n, f in per_set.items()))
    if "data_needed" in summary:
        for n, d in summary["data_needed"].items():
            said = (f"{d['needed']:.2f}x the refined corpus's unique data" if d["needed"] is not None
                    else f"{'more than ' if d['beyond'] == 'above' else 'less than '}"
                    f"{d['points'][-1 if d['beyond'] == 'above' else 0][0]:g}x (outside the arms' range)")
            lines.append(f"C7 {n}: vanilla needs {said} to match MiniPLM")
    return "\n".join(lines)


def plot(summary: dict) -> bytes:
    """Bits per byte per arm, one point per seed, one panel per evaluation set."""
    from io import BytesIO

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["name"] for s in summary["sets"]]
    arms = list(summary["arms"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 4.2), sharey=False)
    for ax, n in zip(axes, names):
        for i, arm in enumerate(arms):
            values = summary["arms"][arm]["bits_per_byte"][n]
            ax.scatter([i] * len(values), values, s=14, color="C0" if "miniplm" in arm else "C1")
            ax.hlines(statistics.fmean(values), i - 0.3, i + 0.3, color="k", lw=1)
        ax.set_xticks(range(len(arms)), arms, rotation=70, fontsize=7)
        ax.set_title(n, fontsize=9)
    axes[0].set_ylabel("bits per byte (lower is better)")
    fig.tight_layout()
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(folder: str, summary: dict) -> None:
    io.write_json(os.path.join(folder, "claims.json"), summary)
    io.write_bytes(os.path.join(folder, "claims.png"), plot(summary))
    io.write_bytes(os.path.join(folder, "claims.md"), (tables(summary) + "\n").encode())
    print(f"\nwritten: {folder}/claims.md, claims.json, claims.png")
