"""Shared fixtures: one in-process Ray for the session, real text, a BPE tokenizer trained
here with `tokenizers`, and tiny HF models built from config and saved like real checkpoints."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

STDLIB_MODULES = ["json", "argparse", "collections", "functools", "itertools", "pathlib",
                  "subprocess", "threading", "logging", "unittest", "typing", "dataclasses",
                  "asyncio", "csv", "email", "http.client", "inspect", "re", "string", "textwrap"]


# Ray Train's controller polls its workers every 2 s by default; tests run a dozen short fits,
# each of which waits for a few polls. Set before any Ray starts, so subprocesses inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API (moto's server on a loopback port). Yields the environment a node needs to
    reach it: endpoint, credentials, and a cache for checkpoints downloaded from it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("moto server did not start")
                time.sleep(0.3)
        yield {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint,
               "MINIPLM_CACHE": str(tmp_path_factory.mktemp("download_cache"))}
    finally:
        if server.poll() is None:  # (one that failed to start has exited: nothing to stop)
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """This session's Ray. Its processes hold the S3 endpoint and credentials in their
    environment, as the nodes of a cluster that reads s3:// do; this process does not."""
    import ray

    saved = {k: os.environ.get(k) for k in s3_server}
    os.environ.update(s3_server)  # inherited by the Ray processes started here
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    finally:  # (ray.init sets variables of its own, such as RAY_AUTH_MODE: those stay)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def documents() -> list[str]:
    """Real English prose and code: docstrings of standard-library modules and functions."""
    docs = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        if module.__doc__:
            docs.append(inspect.cleandoc(module.__doc__))
        for _, obj in sorted(vars(module).items()):
            doc = getattr(obj, "__doc__", None) if callable(obj) else None
            if isinstance(doc, str) and len(doc) > 80 and getattr(obj, "__module__", None) == name:
                docs.append(inspect.cleandoc(doc))
    return docs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_worker_pids(title: str) -> set[int]:
    """PIDs of this session's Ray workers whose process title names `title` (Ray titles an
    actor's process after its class); the in-process Ray's processes all descend from this one."""
    import psutil

    pids = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if title in " ".join(proc.cmdline()):
                pids.add(proc.pid)
        except psutil.Error:  # exited while we looked
            pass
    return pids


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process it started, as a machine failure would. Ray's
    workers run in process groups of their own, so killing the driver's group misses them."""
    import psutil

    root = psutil.Process(pid)
    procs = [*root.children(recursive=True), root]
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=60)


def write_jsonl(path: pathlib.Path, records: list) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# Several `miniplm` commands in one client process: each parses its arguments and runs exactly
# as from the shell, and they share one Python and Ray start-up (seconds each on 2 CPUs).
CLI_SESSION = """
import json, sys
from miniplm.cli import main
for argv in json.loads(sys.argv[1]):
    if main(argv):
        sys.exit(f"miniplm {argv[0]} failed")
"""


def run_cli_sessions(*sessions: tuple[dict, list[list[str]], object]) -> None:
    """For each (env, commands, cwd): `miniplm <command>` for each command, in order, in one new
    process (in `cwd`). The sessions run at the same time, overlapping their start-ups and
    their waits for I/O; their output goes to files, so no pipe fills up and blocks one."""
    import tempfile

    with tempfile.TemporaryDirectory() as logs:
        procs = []
        try:
            for i, (env, commands, cwd) in enumerate(sessions):
                log = open(os.path.join(logs, f"{i}.log"), "w+")
                procs.append((subprocess.Popen([sys.executable, "-c", CLI_SESSION, json.dumps(commands)],
                                               env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT),
                              log))
            for proc, log in procs:
                proc.wait(timeout=600)
                log.seek(0)
                assert proc.returncode == 0, log.read()[-8000:]
        finally:
            for proc, log in procs:
                proc.kill()
                proc.wait()
                log.close()


def train_overrides(corpus, tokenizer_dir, output) -> list[str]:
    """`--set` overrides every training test shares: a tiny model on short sequences."""
    return [f"output={output}", f"data.path={corpus}", f"model.tokenizer={tokenizer_dir}",
            "model.preset=tiny", "data.seq_len=64", "micro_batch=8", "batch_tokens=512",
            "cpus_per_worker=1"]


def read_metrics(output) -> list[dict]:
    """A training run's metrics.jsonl, one dict per logged step."""
    return [json.loads(line) for line in open(os.path.join(output, "metrics.jsonl"))]


def train_tokenizer(docs: list[str], out: pathlib.Path, *, vocab_size: int = 512,
                    bos: bool = True) -> pathlib.Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>"] + (["<s>"] if bos else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   bos_token="<s>" if bos else None)
    fast.save_pretrained(out)
    return out


def save_tiny_model(kind: str, tokenizer_dir: pathlib.Path, out: pathlib.Path, *,
                    context: int = 64, seed: int = 0, hidden: int = 64, layers: int = 2) -> pathlib.Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if kind == "llama":
        config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=context, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    else:
        config = GPT2Config(vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=4,
                            n_positions=context, bos_token_id=tok.eos_token_id,
                            eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random init is near-uniform; sharpen it so scores differ by text
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def save_tiny_qwen2(tokenizer_dir: pathlib.Path, out: pathlib.Path, *, context: int = 64,
                    seed: int = 0, **overrides) -> pathlib.Path:
    """A tiny Qwen2 (q/k/v biases, grouped-query attention), saved like a real checkpoint;
    `overrides` go into its config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # sharpen the near-uniform random init, as save_tiny_model does
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(documents, tmp_path_factory) -> pathlib.Path:
    return train_tokenizer(documents, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def llama_dir(tokenizer_dir, tmp_path_factory) -> pathlib.Path:
    return save_tiny_model("llama", tokenizer_dir, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def gpt2_eos_only_dir(documents, tmp_path_factory) -> pathlib.Path:
    """A GPT-2-family model whose tokenizer has no BOS: sequences start with EOS."""
    tok = train_tokenizer(documents, tmp_path_factory.mktemp("tok_eos"), vocab_size=400, bos=False)
    return save_tiny_model("gpt2", tok, tmp_path_factory.mktemp("gpt2"), context=48)


@pytest.fixture(scope="session")
def corpus_dir(documents, tmp_path_factory) -> pathlib.Path:
    """Two JSONL files of real text, some documents far longer than the tiny models' context."""
    root = tmp_path_factory.mktemp("corpus")
    write_jsonl(root / "docs_a.jsonl", [{"text": d} for d in documents[0::2]])
    write_jsonl(root / "docs_b.jsonl", [{"text": d} for d in documents[1::2]])
    return root


@pytest.fixture(scope="session")
def qwen2_dir(tokenizer_dir, tmp_path_factory) -> pathlib.Path:
    return save_tiny_qwen2(tokenizer_dir, tmp_path_factory.mktemp("qwen2"))


# how the tests score: half a CPU per actor (tokenising tasks get the rest), small batches
SCORE_SETTINGS = dict(cpus_per_worker=0.5, batch_tokens=2048)


@pytest.fixture(scope="session")
def instances(documents, tmp_path_factory, ray_session) -> pathlib.Path:
    """~60 real documents in 4 parts; many longer than the tiny models' 64-token context."""
    from miniplm.data.prepare import PrepareConfig, run_prepare

    root = tmp_path_factory.mktemp("score_corpus")
    write_jsonl(root / "raw" / "docs.jsonl", [{"text": d} for d in documents[:60]])
    out = root / "instances"
    run_prepare(PrepareConfig(inputs=[str(root / "raw")], output=str(out), max_chars=1500,
                              rows_per_part=20))
    return out


def score(instances, model_dir, output, **kw) -> dict:
    """`run_score` of `instances` by `model_dir` into `output`, as the tests score; its manifest."""
    from miniplm.scoring.score import ScoreConfig, run_score

    return run_score(ScoreConfig(instances=str(instances), model=str(model_dir), output=str(output),
                                 **SCORE_SETTINGS, **kw))


@pytest.fixture(scope="session")
def llama_scores(instances, llama_dir, tmp_path_factory):
    """The tiny Llama's score table of `instances`: (manifest, folder). Shared by the tests
    that only read it or compare with it: a run is ~15 s of Ray and model start-up on 2 CPUs."""
    out = tmp_path_factory.mktemp("llama_scores")
    return score(instances, llama_dir, out), out


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`miniplm demo --quick` exactly as a user runs it: a new process, an empty working
    directory, the default (relative) output folder, Ray started by the command itself."""
    cwd = tmp_path_factory.mktemp("newcomer")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    miniplm = os.path.join(os.path.dirname(sys.executable), "miniplm")  # the installed command
    result = subprocess.run([miniplm, "demo", "--quick"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=900)
    console = settled(result.stdout.decode(errors="replace"))
    assert result.returncode == 0, console[-3000:]
    return cwd / "runs" / "demo", console


def settled(console: str) -> str:
    """What a terminal shows once its progress bars settle: of the lines a bar redraws with a
    carriage return, the last one; a bar that cleared itself (tqdm's leave=False) is gone."""
    lines = (line.split("\r")[-1] for line in console.split("\n"))
    return "\n".join(line for line in lines if line.strip() or not line)
