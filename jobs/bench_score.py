"""Benchmark the score stage against the bare model and a naive scorer, side by side.

    python jobs/bench_score.py [--model PATH] [--docs 400] [--device cpu]

On one corpus of mixed lengths (real text from the local Python installation), prints real
(unpadded) tokens/s and peak RSS (the process and all its children, e.g. Ray workers) of:
  score   the score stage end to end (Ray Data read -> tokenise -> actor pool -> Parquet)
  forward the bare model forward over the same windows and token-budget batches
  naive   fixed padded batches of 16 x 1024, full logits, log_softmax, gather
Without --model it builds a ~10M-parameter Llama and a BPE tokenizer trained on the corpus.
"""

from __future__ import annotations

import pathlib
import sys

sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])  # repo root, not jobs/ (jobs/select.py)

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import random  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402


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


def build_model(docs: list[str], out: pathlib.Path) -> pathlib.Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=8192, special_tokens=["<pad>", "</s>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    config = LlamaConfig(vocab_size=len(fast), hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    fast.save_pretrained(out)
    return out


class PeakRSS:
    """Samples the summed RSS of this process and its descendants every 50 ms."""

    def __enter__(self):
        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        import psutil

        while not self.stop.is_set():
            total = 0
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.stop.wait(0.05)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def run_score_stage(args, workdir: pathlib.Path) -> dict:
    import ray

    from miniplm.score import ScoreConfig, run_score

    # the actor gets `threads` CPUs like the other modes, plus one for tokenising tasks
    ray.init(address="local", num_cpus=args.threads + 1, include_dashboard=False, logging_level="ERROR")
    with PeakRSS() as rss:
        start = time.perf_counter()
        manifest = run_score(ScoreConfig(instances=str(workdir / "instances"), model=args.model,
                                         output=str(workdir / "scores"), device=args.device,
                                         batch_tokens=args.batch_tokens, max_length=1024,
                                         cpus_per_worker=args.threads, overwrite=True))
        seconds = time.perf_counter() - start
    ray.shutdown()
    return {"tokens": manifest["tokens"], "seconds": seconds, "peak_rss": rss.peak}


def load(args):
    import torch

    from miniplm.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device, dtype="auto")
    return model, load_tokenizer(args.model)


def run_bare_forward(args, docs: list[str]) -> dict:
    """The forward passes the score stage needs (same windows, same packing), nothing else."""
    import torch

    from miniplm.logprob import pack_by_tokens, windows

    model, tok = load(args)
    seqs = [[tok.bos_token_id] + x for x in tok(docs, add_special_tokens=False)["input_ids"]]
    wins = [seq[w.start:w.end] for seq in seqs for w in windows(len(seq), 1024, 512)]
    with PeakRSS() as rss, torch.inference_mode():
        start = time.perf_counter()
        for batch in pack_by_tokens([len(w) for w in wins], args.batch_tokens):
            longest = max(len(wins[i]) for i in batch)
            ids = torch.zeros(len(batch), longest, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(batch):
                ids[r, : len(wins[i])] = torch.tensor(wins[i])
                mask[r, : len(wins[i])] = 1
            model(input_ids=ids.to(args.device), attention_mask=mask.to(args.device))
        seconds = time.perf_counter() - start
    return {"tokens": sum(len(s) - 1 for s in seqs), "seconds": seconds, "peak_rss": rss.peak}


def run_naive(args, docs: list[str]) -> dict:
    import torch

    model, tok = load(args)
    tok.padding_side = "right"
    tokens = 0
    with PeakRSS() as rss, torch.inference_mode():
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
    return {"tokens": tokens, "seconds": seconds, "peak_rss": rss.peak}


def _child(name: str, args, docs, workdir, queue):
    fn = {"score": lambda: run_score_stage(args, workdir), "forward": lambda: run_bare_forward(args, docs),
          "naive": lambda: run_naive(args, docs)}[name]
    queue.put(fn())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF causal LM folder (default: build a ~10M Llama)")
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    args = parser.parse_args()

    import ray

    from miniplm.prepare import PrepareConfig, run_prepare

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench_score_"))
    docs = mixed_length_corpus(args.docs)
    args.model = args.model or str(build_model(docs, workdir / "model"))
    (workdir / "raw").mkdir()
    (workdir / "raw" / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    run_prepare(PrepareConfig(inputs=[str(workdir / "raw")], output=str(workdir / "instances"),
                              max_chars=1 << 20, rows_per_part=max(1, args.docs // 4)))
    ray.shutdown()

    results = {}
    ctx = mp.get_context("spawn")  # each mode in a fresh process: peak RSS is its own
    for name in ("score", "forward", "naive"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(name, args, docs, workdir, queue))
        proc.start()
        results[name] = queue.get()
        proc.join()
        print(f"{name}: done", flush=True)

    base = results["naive"]["tokens"] / results["naive"]["seconds"]
    print(f"\n{args.docs} docs, model {args.model}, device {args.device}")
    print(f"{'mode':8} {'tokens':>9} {'seconds':>8} {'tokens/s':>10} {'vs naive':>9} {'peak RSS':>10}")
    for name, r in results.items():
        rate = r["tokens"] / r["seconds"]
        print(f"{name:8} {r['tokens']:>9} {r['seconds']:>8.1f} {rate:>10,.0f} {rate / base:>8.2f}x "
              f"{r['peak_rss'] / 2**20:>8.0f}MB")
    print("(score and forward score every token, long documents in 1024-token windows that re-read "
          "512 tokens of context; naive truncates documents at 1024 tokens)")


if __name__ == "__main__":
    main()
