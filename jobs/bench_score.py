"""Benchmark the score stage against the bare model forward, side by side in one run.

    python jobs/bench_score.py [--model PATH | --preset NAME] [--docs 3000] [--device cpu|cuda]

On one corpus of mixed lengths (real text from the local Python installation; the default
~2.07M tokens, so start-up costs amortise as in a real pass), prints real (unpadded) tokens/s,
and peak memory (CPU: RSS of the process and all its children, e.g. Ray workers; cuda: peak
GPU memory allocated) of:
  score           the score stage end to end (Ray Data read -> tokenise -> actor pool -> Parquet)
  forward-padded  the bare model forward over the same windows, length-sorted padded rows
  forward-packed  the bare model forward over the same windows packed into one row per batch;
                  on CPU (no varlen attention kernel: a packed row gets a dense mask over its
                  16k tokens) only the first --packed-docs documents, beside a padded row on
                  the same documents, both labelled [first N docs]
  naive           fixed padded batches of 16 x 1024, full logits, log_softmax (on --naive-docs)
  memory V=...    the in-process scorer on --memory-docs with two vocabulary sizes: its memory
                  above the loaded model stays flat (no [batch, seq, vocab] logits)
On cuda each row also shows MFU: model FLOPs (2 x non-embedding parameters per token read,
attention 2 x layers x hidden x window^2, LM head 2 x vocab x hidden per scored token) per
second over the device's dense bf16 peak (a table of known devices; elsewhere a measured
matmul rate, labelled so).
Without --model it builds a ~10M-parameter Llama (or --preset's shape) and a BPE tokenizer
trained on the corpus.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import pathlib
import random
import sysconfig
import tempfile
import threading
import time


def mixed_length_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Slices of standard-library source: lengths spread from a line to a few pages."""
    files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    rng = random.Random(seed)
    docs = []
    while len(docs) < n_docs:
        text = rng.choice(files).read_text(errors="ignore")
        length = int(10 ** rng.uniform(2, 4.2))  # 100 .. 16k characters, log-uniform
        start = rng.randrange(max(1, len(text) - length))
        if text[start:start + length].strip():
            docs.append(text[start:start + length])
    return docs


def build_model(docs: list[str], out: pathlib.Path, preset: str | None = None) -> pathlib.Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=8192, special_tokens=["<pad>", "</s>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    config = bench_config(len(fast)) if preset is None else preset_config(preset, fast)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def bench_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                       tie_word_embeddings=True)


def preset_config(preset: str, tokenizer):
    """A model shape `train` builds (e.g. qwen-500m), randomly initialised: throughput does not
    depend on the weights."""
    from miniplm.models import ModelSpec, model_config

    return model_config(ModelSpec(preset=preset), tokenizer, seq_len=1024)


def with_vocabulary(model: str, vocab_size: int, out: pathlib.Path) -> pathlib.Path:
    """The same shape with a larger LM head (its tokenizer's ids stay valid)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model)
    config.vocab_size = vocab_size
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return out


class PeakMemory:
    """Peak memory while the block runs: on cuda the peak GPU memory allocated; on cpu the
    summed RSS of this process and its descendants, sampled every 0.5 s (at 50 ms, walking a
    dozen Ray processes from inside the measuring process added to the CPU it took from the
    score stage: that process ran at 16% of a core while the stage ran on 2)."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        import psutil

        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def rss(self) -> int:
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.rss())
            self.stop.wait(0.5)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()


def in_use(device: str) -> int:
    """Memory held now: GPU memory allocated on cuda, this process's RSS on cpu."""
    if device == "cuda":
        import torch

        return torch.cuda.memory_allocated()
    import psutil

    return psutil.Process().memory_info().rss


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def run_score_stage(args, workdir: pathlib.Path) -> dict:
    import ray

    from miniplm.scoring.score import ScoreConfig, run_score

    # the actor gets `threads` CPUs like the other modes, plus one for tokenising tasks
    ray.init(address="local", num_cpus=args.threads + 1, include_dashboard=False, logging_level="ERROR")
    with PeakMemory("cpu") as mem:  # the actor is another process: its GPU peak is not ours
        start = time.perf_counter()
        manifest = run_score(ScoreConfig(instances=str(workdir / "instances"), model=args.model,
                                         output=str(workdir / "scores"), device=args.device,
                                         batch_tokens=args.batch_tokens, max_length=1024,
                                         cpus_per_worker=args.threads, overwrite=True))
        seconds = time.perf_counter() - start
    ray.shutdown()
    return {"tokens": manifest["tokens"], "seconds": seconds, "peak": mem.peak, "peak_of": "RSS"}


def load(args, model: str | None = None):
    import torch

    from miniplm.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    return load_model(model or args.model, device=args.device, dtype="auto"), load_tokenizer(args.model)


def bench_windows(tok, docs: list[str]) -> tuple[list[list[int]], list[int], int]:
    """The score stage's windows (1024 tokens, stride 512) of every document, how many tokens
    each scores, and the documents' token count."""
    from miniplm.scoring.logprob import windows

    seqs = [[tok.bos_token_id] + x for x in tok(docs, add_special_tokens=False)["input_ids"]]
    wins = [(seq[w.start:w.end], w.end - w.first_target) for seq in seqs
            for w in windows(len(seq), 1024, 512)]
    return [w for w, _ in wins], [n for _, n in wins], sum(len(s) - 1 for s in seqs)


def model_flops(model, wins: list[list[int]], scored: list[int]) -> float:
    """Forward FLOPs the scoring needs: 2 x non-embedding parameters per token read, causal
    attention 2 x layers x hidden x length^2 per window, LM head 2 x vocab x hidden per
    scored token."""
    config = model.config
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight
    tied = head is model.get_input_embeddings().weight
    body = sum(p.numel() for p in model.parameters()) - embed - (0 if tied else head.numel())
    read = sum(len(w) for w in wins)
    attention = 2 * config.num_hidden_layers * config.hidden_size * sum(len(w) ** 2 for w in wins)
    return 2 * body * read + attention + 2 * head.numel() * sum(scored)


def run_forward(args, docs: list[str], layout: str) -> dict:
    """The forward passes the score stage needs (same windows, same batching), nothing else:
    the model's own forward with its full logits, no cache."""
    import torch

    from miniplm.scoring.logprob import pack_by_tokens, pack_flat

    model, tok = load(args)
    wins, scored, tokens = bench_windows(tok, docs)
    plan = (pack_flat if layout == "packed" else pack_by_tokens)([len(w) for w in wins], args.batch_tokens)
    with PeakMemory(args.device) as mem, torch.inference_mode():
        start = time.perf_counter()
        for batch in plan:
            if layout == "packed":  # one row, positions restarting per window, no mask
                ids = torch.tensor([t for i in batch for t in wins[i]])[None]
                pos = torch.tensor([p for i in batch for p in range(len(wins[i]))])[None]
                model(input_ids=ids.to(args.device), position_ids=pos.to(args.device), use_cache=False)
                continue
            longest = max(len(wins[i]) for i in batch)
            ids = torch.zeros(len(batch), longest, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(batch):
                ids[r, : len(wins[i])] = torch.tensor(wins[i])
                mask[r, : len(wins[i])] = 1
            model(input_ids=ids.to(args.device), attention_mask=mask.to(args.device), use_cache=False)
        sync(args.device)
        seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "peak": mem.peak, "flops": model_flops(model, wins, scored)}


def run_naive(args, docs: list[str]) -> dict:
    import torch

    model, tok = load(args)
    tok.padding_side = "right"
    tokens = 0
    with PeakMemory(args.device) as mem, torch.inference_mode():
        start = time.perf_counter()
        for i in range(0, len(docs), 16):
            enc = tok([tok.bos_token + d for d in docs[i:i + 16]], add_special_tokens=False,
                      padding="max_length", truncation=True, max_length=1024, return_tensors="pt")
            ids, mask = enc["input_ids"].to(args.device), enc["attention_mask"].to(args.device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (16, 1024, V)
            logp = torch.log_softmax(logits, dim=-1)[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
            (logp * mask[:, 1:]).sum(1).double().cpu()
            tokens += int(mask[:, 1:].sum())
        seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "peak": mem.peak}


def run_scorer_memory(args, docs: list[str], model_dir: str) -> dict:
    """The scorer in-process (no Ray): peak memory above the loaded model."""
    import numpy as np

    from miniplm.scoring.logprob import SequenceScorer

    model, tok = load(args, model_dir)
    seqs = [np.array(x) for x in tok(docs, add_special_tokens=False)["input_ids"]]
    scorer = SequenceScorer(model, max_length=1024, stride=512, batch_tokens=args.batch_tokens,
                            prefix_id=tok.bos_token_id)
    sync(args.device)
    loaded = in_use(args.device)
    with PeakMemory(args.device) as mem:
        start = time.perf_counter()
        scorer.score(seqs)
        sync(args.device)
        seconds = time.perf_counter() - start
    return {"tokens": sum(len(s) for s in seqs), "seconds": seconds, "peak": mem.peak,
            "above_model": mem.peak - loaded}


def device_peak(device: str) -> tuple[float, str]:
    """The device's dense bf16 peak FLOP/s and where that figure comes from: training's MFU
    table, else training's measured matmul rate, labelled as measured."""
    import torch

    from miniplm.training.flops import measure_peak_flops, table_peak

    name = torch.cuda.get_device_name()
    known = table_peak(torch.device(device))
    if known:
        return known[0], f"{name}, dense bf16 peak {known[0] / 1e12:.0f} TFLOP/s"
    rate = measure_peak_flops(torch.device(device))
    return rate, f"{name}, not in the table: MEASURED bf16 matmul rate {rate / 1e12:.0f} TFLOP/s"


def _child(job: tuple, args, docs, workdir, queue):
    name, arg = job
    queue.put({"score": lambda: run_score_stage(args, workdir),
               "forward": lambda: run_forward(args, docs[:arg[1]], arg[0]),
               "naive": lambda: run_naive(args, docs[:args.naive_docs]),
               "memory": lambda: run_scorer_memory(args, docs[:args.memory_docs], arg)}[name]())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF causal LM folder (default: build a ~10M Llama)")
    parser.add_argument("--preset", help="without --model: build this miniplm preset (e.g. qwen-500m) "
                        "instead of the ~10M Llama")
    parser.add_argument("--docs", type=int, default=3000, help="documents (3000: ~2.07M tokens)")
    parser.add_argument("--naive-docs", type=int, default=400, help="documents for the naive row")
    parser.add_argument("--packed-docs", type=int,
                        help="documents for the packed forward (default: all on cuda, 60 on cpu)")
    parser.add_argument("--memory-docs", type=int, default=100, help="documents for the memory rows")
    parser.add_argument("--vocabularies", default="16384,131072",
                        help="LM-head sizes for the memory rows (default model only)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--modes", default="score,forward-padded,forward-packed,naive,memory")
    args = parser.parse_args()

    import ray

    from miniplm.data.prepare import PrepareConfig, run_prepare

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench_score_"))
    docs = mixed_length_corpus(args.docs)
    built = args.model is None
    args.model = args.model or str(build_model(docs, workdir / "model", args.preset))
    (workdir / "raw").mkdir()
    (workdir / "raw" / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    run_prepare(PrepareConfig(inputs=[str(workdir / "raw")], output=str(workdir / "instances"),
                              max_chars=1 << 20, rows_per_part=max(1, args.docs // 8)))
    ray.shutdown()

    modes = args.modes.split(",")
    jobs = [(m, None) for m in ("score", "naive") if m in modes]
    packed_docs = args.packed_docs or (args.docs if args.device == "cuda" else 60)
    forwards = [("padded", args.docs)] if "forward-padded" in modes else []
    if "forward-packed" in modes:
        forwards += [("padded", packed_docs), ("packed", packed_docs)] if packed_docs < args.docs \
            else [("packed", args.docs)]
    jobs[1:1] = [("forward", f) for f in dict.fromkeys(forwards)]
    if "memory" in modes:
        for vocab in map(int, args.vocabularies.split(",")) if built else [None]:
            path = args.model if vocab in (None, 8192) else str(with_vocabulary(
                args.model, vocab, workdir / f"model-v{vocab}"))
            jobs.append(("memory", path))
    results = {}
    ctx = mp.get_context("spawn")  # each mode in a fresh process: peak memory is its own
    for job in jobs:
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(job, args, docs, workdir, queue))
        proc.start()
        results[job] = queue.get()
        proc.join()
        r = results[job]
        print(f"{row_label(job, args.docs)}: {r['tokens']} tokens in {r['seconds']:.1f}s, "
              f"{r['tokens'] / r['seconds']:,.0f} tokens/s, peak {r['peak'] / 2**20:.0f}MB", flush=True)

    print(f"\n{args.docs} docs, model {args.model}, device {args.device}, {args.threads} threads, "
          f"batch {args.batch_tokens} tokens")
    flops_per_token = peak = None
    forwards = {arg: r for (name, arg), r in results.items() if name == "forward"}
    if forwards:
        first = next(iter(forwards.values()))
        flops_per_token = first["flops"] / first["tokens"]
    if args.device == "cuda":
        peak, peak_label = device_peak(args.device)
        print(f"MFU against {peak_label}")
    # each row against the fastest bare forward over the same documents
    best = {n: max(r["tokens"] / r["seconds"] for (_, m), r in forwards.items() if m == n)
            for _, n in forwards}
    mem_label = "peak GPU" if args.device == "cuda" else "peak RSS"
    print(f"{'mode':30} {'tokens':>9} {'seconds':>8} {'tokens/s':>10} {'vs best fwd':>11} "
          f"{'MFU':>6} {mem_label:>9} {'above model':>11}")
    for (name, arg), r in results.items():
        rate = r["tokens"] / r["seconds"]
        same_docs = best.get(arg[1] if name == "forward" else args.docs if name == "score" else None)
        ratio = f"{rate / same_docs:>10.0%}" if same_docs else f"{'':>10}"
        mfu = f"{rate * flops_per_token / peak:>6.1%}" if peak and flops_per_token else f"{'':>6}"
        peak_of = "RSS " if r.get("peak_of") == "RSS" and args.device == "cuda" else ""
        above = f"{r['above_model'] / 2**20:>9.0f}MB" if "above_model" in r else ""
        print(f"{row_label((name, arg), args.docs):30} {r['tokens']:>9} {r['seconds']:>8.1f} {rate:>10,.0f} {ratio} {mfu} "
              f"{peak_of}{r['peak'] / 2**20:>7.0f}MB {above:>11}")
    print("(score and forward rows score every token, long documents in 1024-token windows that "
          "re-read 512 tokens of context; 'vs best fwd' compares with the fastest bare forward over "
          "the same documents; naive truncates documents at 1024 tokens; the memory rows "
          f"run the scorer in-process on the first {args.memory_docs} documents)")


def row_label(job: tuple, all_docs: int) -> str:
    name, arg = job
    if name == "forward":
        layout, n = arg
        return f"forward-{layout}" + (f" [first {n} docs]" if n < all_docs else "")
    return f"memory V={_vocab(arg)}" if name == "memory" else name


def _vocab(model_dir: str) -> int:
    return json.loads((pathlib.Path(model_dir) / "config.json").read_text())["vocab_size"]


if __name__ == "__main__":
    main()
