"""eval: a checkpoint on held-out instances -> LM loss per token and bits per byte, plus
optional zero-shot accuracy through lm-evaluation-harness.

The held-out loss reuses the score stage (the same exact, windowed log-likelihoods), so there
is one log-likelihood implementation. Bits per byte, `-sum log p / (ln 2 * bytes)`, compares
models with different tokenizers.
"""

from __future__ import annotations

import dataclasses
import math
import os
import posixpath

from miniplm import __version__, console, io
from miniplm.config import describe, field, to_dict

# The MiniPLM paper's 9 zero-shot tasks (lm-evaluation-harness names); needs internet for
# the datasets. StoryCloze needs a manual download in lm-eval, so it is left to the user.
PAPER_TASKS = ["hellaswag", "lambada_openai", "winogrande", "openbookqa", "arc_easy",
               "arc_challenge", "piqa", "social_iqa"]


@dataclasses.dataclass(kw_only=True, frozen=True)
class EvalConfig:
    model: str = field(model=True, help="checkpoint: a folder (HF save_pretrained layout), a URL, or a "
                                        "Hugging Face Hub id org/name[@revision]")
    data: str = field(path=True, help="held-out instances dataset")
    output: str = field(path=True, help="JSON file for the results (scores go to a folder beside it)")
    tasks: list[str] = field([], help="lm-eval tasks: names, local task YAML files, or `paper`")
    limit: int | None = field(None, help="lm-eval: at most this many examples per task")
    max_length: int | None = field(None, help="context per forward pass (default: the model's declared "
                                              "context; longer texts are scored with a sliding window)")
    batch_tokens: int = field(16384, help="padded tokens per forward pass")
    cpus_per_worker: float = field(1.0, help="CPUs of the scoring actor")
    device: str = field("auto", help="cpu, cuda or auto")


def run_eval(cfg: EvalConfig) -> dict:
    from miniplm.io import read_instances_manifest
    from miniplm.scoring.score import ScoreConfig, run_score

    console.detail(describe(cfg))
    instances = read_instances_manifest(cfg.data)
    scores_dir = posixpath.splitext(cfg.output)[0] + ".scores"
    scores = run_score(ScoreConfig(instances=cfg.data, model=cfg.model, output=scores_dir,
                                   max_length=cfg.max_length, batch_tokens=cfg.batch_tokens,
                                   cpus_per_worker=cfg.cpus_per_worker,
                                   device=cfg.device, overwrite=_stale(scores_dir, cfg.model)),
                       say=console.detail)
    logprob = scores["logprob"]  # summed by the score stage as it checked its table
    n_bytes = instances["bytes"]
    loss = -logprob / scores["tokens"]
    result = {
        "model": cfg.model, "data": cfg.data, "version": __version__, "config": to_dict(cfg),
        "provenance": scores["provenance"], "instances": scores["rows"], "tokens": scores["tokens"],
        "bytes": n_bytes, "loss_per_token": loss, "perplexity": math.exp(min(loss, 700)),
        "bits_per_byte": -logprob / (math.log(2) * n_bytes), "tasks": {},
    }
    if cfg.tasks:
        result["tasks"] = run_lm_eval(cfg.model, cfg.tasks, cfg.device, cfg.limit)
    io.write_json(cfg.output, result)
    print(f"eval: loss/token {loss:.4f}, bits/byte {result['bits_per_byte']:.4f} on "
          f"{result['instances']} instances" + "".join(
              f", {t} acc {m.get('acc', float('nan')):.3f}" for t, m in result["tasks"].items()))
    return result


def _stale(scores_dir: str, model: str) -> bool:
    """Re-evaluating a checkpoint that changed (a later step) replaces the old scores."""
    job = io.join(scores_dir, io.JOB)
    if not io.exists(job):
        return False
    from miniplm.models import model_fingerprint

    return io.read_json(job).get("model_fingerprint") != model_fingerprint(model)


def task_name(path: str) -> str:
    """The `task:` of an lm-eval task YAML. lm-eval's own tags (`!function utils.process_docs`)
    are left to lm-eval: only the name is read here."""
    import yaml

    class TaskLoader(yaml.SafeLoader):
        pass

    TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: None)
    with open(path) as f:
        spec = yaml.load(f, Loader=TaskLoader)  # noqa: S506 (a SafeLoader that skips tags)
    if not isinstance(spec, dict) or not spec.get("task"):
        raise ValueError(f"{path}: an lm-eval task YAML needs a `task:` name")
    return str(spec["task"])


def run_lm_eval(model: str, tasks: list[str], device: str, limit: int | None) -> dict:
    """Zero-shot accuracy with lm-evaluation-harness's `hf` model on the local checkpoint.
    Local task YAML files run offline (their datasets can be local JSON files)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise RuntimeError("lm-eval tasks need the `eval` extra: pip install 'miniplm[eval]'") from err

    names, include = [], []
    for task in tasks:
        if task == "paper":
            names += PAPER_TASKS
        elif task.endswith((".yaml", ".yml")):
            names.append(task_name(task))
            include.append(os.path.dirname(os.path.abspath(task)))
        else:
            names.append(task)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": io.local_copy(model), "dtype": "float32" if device == "cpu" else "bfloat16"},
        tasks=names, task_manager=TaskManager(include_path=sorted(set(include)) or None),
        device=device, batch_size=8, limit=limit, log_samples=False)
    results = {}
    for name, metrics in out["results"].items():
        results[name] = {k.split(",")[0]: v for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not k.startswith("alias")}
    return results
