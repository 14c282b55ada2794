"""distill: the chunked LM loss equals the model's own `labels=` loss and its gradients; the KD
loss equals one computed independently from both models' full logits; the teacher gets no
gradient and stays out of checkpoints; kd.weight 0 trains exactly as plain training does;
a teacher with another tokenizer is refused before Ray starts; FLOPs are counted per model."""

from __future__ import annotations

import glob

import pytest
import torch
from conftest import read_metrics, save_tiny_model, train_overrides, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

from miniplm.config import load
from miniplm.training.distill import Objective, enable_activation_checkpointing, head_is_plain
from miniplm.training.flops import matmul_params
from miniplm.training.train import TrainConfig, run_train


def tiny(kind: str, vocab: int, *, hidden: int = 64, layers: int = 2, seed: int = 0):
    if kind == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64)
    else:
        config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
                            bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # sharpen the near-uniform init so the distributions differ
        model.get_output_embeddings().weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def batch(tokenizer_dir, documents) -> torch.Tensor:
    """(3, 40) real token ids; 3 x 40 = 120 positions, so blocks of 17 leave a ragged last one."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok("\n\n".join(documents[:20]), add_special_tokens=False)["input_ids"][:120]
    return torch.tensor(ids).view(3, 40)


def grads(model) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_chunked_loss_equals_the_models_loss_and_gradients(kind, activation_checkpointing, batch, tokenizer_dir):
    model = tiny(kind, len(AutoTokenizer.from_pretrained(tokenizer_dir)))
    expected = model(input_ids=batch, labels=batch).loss
    expected.backward()
    expected_grads = grads(model)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    objective = Objective(model, chunk_tokens=17)
    assert objective.student_plain  # the chunked head, not the fallback
    total, lm, kd = objective(batch)
    total.backward()
    assert total.item() == pytest.approx(expected.item(), abs=1e-5) and lm.item() == total.item()
    assert kd.item() == 0.0
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    assert list(objective.state_dict()) == [f"student.{k}" for k in model.state_dict()]


def test_model_that_post_processes_logits_falls_back_to_its_own(batch, tokenizer_dir):
    from transformers import Gemma2Config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          max_position_embeddings=64, final_logit_softcapping=3.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert not head_is_plain(model)
    expected = model(input_ids=batch, labels=batch).loss
    expected.backward()
    expected_grads = grads(model)
    with pytest.warns(UserWarning, match="post-processes its logits"):
        objective = Objective(model, chunk_tokens=17)
    objective(batch)[0].backward()
    assert objective(batch)[0].item() == pytest.approx(expected.item(), abs=1e-5)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def reference_kd_loss(student, teacher, x, weight: float, temperature: float) -> torch.Tensor:
    """Plain torch, full logits: (1 - w) * CE + w * tau^2 * mean_t KL(p_t || p_s) over the
    positions that have a next token."""
    s_logits = student(input_ids=x).logits[:, :-1].float()  # (B, T-1, V)
    with torch.no_grad():
        t_logits = teacher(input_ids=x).logits[:, :-1].float()
    ce = torch.nn.functional.cross_entropy(s_logits.reshape(-1, s_logits.shape[-1]), x[:, 1:].reshape(-1))
    t_logp = torch.log_softmax(t_logits / temperature, dim=-1)
    s_logp = torch.log_softmax(s_logits / temperature, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # (B, T-1)
    return (1 - weight) * ce + weight * temperature**2 * kl.mean()


@pytest.mark.parametrize("weight, temperature, teacher_kind", [(0.5, 1.0, "gpt2"), (0.3, 2.0, "llama")])
def test_kd_loss_equals_an_independent_computation(weight, temperature, teacher_kind, batch, tokenizer_dir):
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    student = tiny("llama", vocab)
    teacher = tiny(teacher_kind, vocab, hidden=96, layers=3, seed=1)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    expected = reference_kd_loss(student, teacher, batch, weight, temperature)
    expected.backward()
    expected_grads = grads(student)

    objective = Objective(student, teacher=teacher, weight=weight, temperature=temperature, chunk_tokens=17)
    total, lm, kd = objective(batch)
    total.backward()
    assert total.item() == pytest.approx(expected.item(), abs=1e-5)
    assert kd.item() > 0.01 and total.item() == pytest.approx((1 - weight) * lm.item() + weight * kd.item(), abs=1e-6)
    for name, grad in grads(student).items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    # the teacher: frozen, no gradient, unchanged, and not part of the trained module
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert not teacher.training
    trained = {id(p) for p in objective.parameters()}
    assert trained == {id(p) for p in student.parameters()}
    assert not any(id(p) in trained for p in teacher.parameters())
    assert all(k.startswith("student.") for k in objective.state_dict())


def test_kd_over_a_teacher_with_a_padded_vocabulary(batch, tokenizer_dir):
    """A teacher whose embedding has rows past the tokenizer (Qwen1.5's padding): the KL runs
    over the shared ids, the teacher renormalised there."""
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    student, teacher = tiny("llama", vocab), tiny("llama", vocab + 64, seed=1)
    total = Objective(student, teacher=teacher, weight=1.0, chunk_tokens=17)(batch)[0]
    s = torch.log_softmax(student(input_ids=batch).logits[:, :-1], -1)
    t = torch.log_softmax(teacher(input_ids=batch).logits[:, :-1, :vocab], -1)
    assert total.item() == pytest.approx((t.exp() * (t - s)).sum(-1).mean().item(), abs=1e-5)


def test_matmul_params_count_the_head_once_and_no_lookups(tokenizer_dir):
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    llama, gpt2 = tiny("llama", vocab), tiny("gpt2", vocab)
    total = sum(p.numel() for p in llama.parameters())
    embed = llama.get_input_embeddings().weight
    tied = llama.get_output_embeddings().weight is embed
    assert matmul_params(llama) == total - (0 if tied else embed.numel())
    # GPT-2: tied head; the position table is a lookup, not a matmul
    wpe = gpt2.transformer.wpe.weight.numel()
    assert matmul_params(gpt2) == sum(p.numel() for p in gpt2.parameters()) - wpe


# ---------------------------------------------------------------- through run_train


@pytest.fixture(scope="module")
def corpus(documents, tmp_path_factory, ray_session):
    from miniplm.data.prepare import PrepareConfig, run_prepare

    root = tmp_path_factory.mktemp("kd_corpus")
    write_jsonl(root / "raw" / "a.jsonl", [{"text": d} for d in documents])
    run_prepare(PrepareConfig(inputs=[str(root / "raw")], output=str(root / "inst"), max_chars=1000,
                              rows_per_part=200))
    return root / "inst"


@pytest.fixture(scope="module")
def teacher_dir(tokenizer_dir, tmp_path_factory):
    """A teacher unlike the student (hidden 96, 3 layers) sharing its tokenizer."""
    return save_tiny_model("llama", tokenizer_dir, tmp_path_factory.mktemp("teacher"), hidden=96, layers=3)


def config(corpus, tokenizer_dir, output, *overrides) -> TrainConfig:
    return load(TrainConfig, None, train_overrides(corpus, tokenizer_dir, output)
                + ["optim.warmup_steps=2", "steps=4", *overrides])


@pytest.mark.timeout(600)
def test_kd_weight_zero_trains_exactly_as_plain_training(corpus, tokenizer_dir, teacher_dir, tmp_path):
    """Both runs use the memory options (recomputed activations, the loss in blocks of 100
    positions), which change no maths; the KD loss's identity at weight 0.5 is checked on the
    demo's KD student (test_pipeline.py)."""
    plain, kd = tmp_path / "plain", tmp_path / "kd"
    memory = ["activation_checkpointing=true", "loss_chunk_tokens=100"]
    run_train(config(corpus, tokenizer_dir, plain, *memory))
    run_train(config(corpus, tokenizer_dir, kd, *memory, f"kd.teacher={teacher_dir}", "kd.weight=0",
                     "kd.temperature=2"))
    plain_rows, kd_rows = read_metrics(plain), read_metrics(kd)
    assert [r["loss"] for r in kd_rows] == [r["loss"] for r in plain_rows]
    assert [r["grad_norm"] for r in kd_rows] == [r["grad_norm"] for r in plain_rows]
    assert all(r["lm_loss"] == r["loss"] and r["kd_loss"] > 0 for r in kd_rows)

    # FLOPs per model: the teacher's forward is counted, the student's count is unchanged
    last, plain_last = kd_rows[-1], plain_rows[-1]
    assert last["student_flops"] == plain_last["student_flops"] == plain_last["flops"] > 0
    assert plain_last["teacher_flops"] == 0 and last["teacher_flops"] > 0
    assert last["flops"] == last["student_flops"] + last["teacher_flops"]
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    n_teacher = matmul_params(teacher)
    assert last["teacher_flops"] == (2 * n_teacher + 4 * 3 * 96 * 64) * last["tokens"]
    assert "teacher" in kd_rows[0]["flops_formula"] and "student" in plain_rows[0]["flops_formula"]
    assert kd_rows[0]["mfu_peak_source"] == "measured matmul rate" and 0 < last["mfu"] < 1

    # the checkpoint and the final model hold the student alone
    (state_file,) = glob.glob(str(kd / "ray" / "*" / "state.pt"))
    saved = torch.load(state_file, weights_only=False)
    final = AutoModelForCausalLM.from_pretrained(kd / "final")
    assert final.config.hidden_size == 64 and final.config.num_hidden_layers == 2
    student_state = final.state_dict()
    assert set(saved["model"]) == set(student_state)
    assert all(saved["model"][k].shape == v.shape for k, v in student_state.items())
    assert len(saved["optimizer"]["state"]) == len(list(final.parameters()))


def test_teacher_with_another_tokenizer_is_refused_before_ray_starts(corpus, tokenizer_dir, gpt2_eos_only_dir,
                                                                       tmp_path, monkeypatch):
    import miniplm.runtime

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(miniplm.runtime, "init_ray", no_ray)
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="kd.teacher: .* uses another tokenizer than the student's"):
        run_train(config(corpus, tokenizer_dir, out, f"kd.teacher={gpt2_eos_only_dir}"))
    with pytest.raises(ValueError, match="kd.teacher: no HF checkpoint"):
        run_train(config(corpus, tokenizer_dir, out, f"kd.teacher={tmp_path / 'missing'}"))
    assert not out.exists()


@pytest.mark.parametrize("override, message", [
    ("kd.weight=1.5", "kd.weight must be in"),
    ("kd.temperature=0", "kd.temperature must be > 0"),
    ("kd.teacher=teacher", "kd.teacher: `teacher` names a pipeline's teacher"),
    ("loss_chunk_tokens=0", "loss_chunk_tokens must be >= 1"),
])
def test_bad_kd_configs_name_the_key(override, message, tokenizer_dir, tmp_path):
    overrides = [f"output={tmp_path}", f"data.path={tmp_path}", f"model.tokenizer={tokenizer_dir}", "steps=1",
                 "kd.teacher=/some/teacher", override]
    with pytest.raises(ValueError, match=message):
        load(TrainConfig, None, overrides)
