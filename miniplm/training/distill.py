"""The training objective: next-token loss and online token-level KD, without [batch, seq, vocab]
float32 logits, and the FLOPs they cost.

`Objective` wraps the student (the module Ray Train's DDP wraps, so gradients still sync) and
an optional frozen teacher (held outside the module tree: never in a state dict, never given
to the optimizer, never synced). Its forward runs each model's backbone once for hidden states
(B, T, H), then, over blocks of `chunk_tokens` positions, the LM head in float32 and

    loss = (1 - w) * LM + w * tau^2 * KL(p_teacher^tau || p_student^tau)

with LM the mean next-token cross-entropy and KL the mean per-token divergence between the
temperature-softened distributions over the vocabulary, both averaged over the positions that
have a next token (as HF's `labels=` loss does). tau^2 keeps the KL's gradient scale
independent of tau (Hinton et al., 2015); at tau = 1 the term is the plain KL.

Each block's gradient with respect to its logits is closed-form (softmax minus one-hot for the
LM term, tau x (student softmax minus teacher probabilities) for the KL), so `BlockedHeadLoss`
computes it in the forward pass, right after the block's logits, and folds it into the
gradients of the hidden states (N, H) and of the head (V, H); the backward only scales those.
No block's logits outlive the block, and nothing is recomputed: per-block activation
checkpointing (`torch.utils.checkpoint`) would hold the same memory but run both models' LM
heads and softmaxes twice, which at Qwen's 151k vocabulary is ~18% more compute for a 200M
student. Peak extra memory: a few (chunk, V) float32 blocks, plus the stored gradients.
Models whose logits are not `lm_head(last_hidden_state)` (soft-capping, scaling) fall back
to the model's own logits, still reduced block by block in float32 (their [B, T, V] logits
then exist, in the model's dtype, and so does their gradient).

The teacher's vocabulary may be padded beyond the student's (Qwen1.5: 151,936 rows for a
151,646-token tokenizer): the KL runs over the shared first min(V_s, V_t) ids, the teacher
renormalised there; ids only the student has get no teacher mass.

FLOPs (PaLM / Chinchilla accounting, per token): training 6 x N + 12 x layers x hidden x seq,
forward only 2 x N + 4 x layers x hidden x seq, where N is every weight a token is multiplied
by: all parameters except embedding lookups (token and position tables), the LM head included
even when tied to the input embedding.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from miniplm.models import head_is_plain
from miniplm.training.flops import flops_formula, flops_per_token

IGNORE = -100  # target of the last position of each row: nothing follows it

# ---------------------------------------------------------------- the objective


class Objective(torch.nn.Module):
    """forward(input_ids (B, T)) -> (3,) tensor: total loss, LM loss, KL (0 without a teacher)."""

    def __init__(self, student, *, teacher=None, weight: float = 0.0, temperature: float = 1.0,
                 chunk_tokens: int = 1024):
        super().__init__()
        self.student = student
        self.weight, self.temperature, self.chunk_tokens = float(weight), float(temperature), chunk_tokens
        self.student_plain = head_is_plain(student)
        if not self.student_plain:
            warnings.warn("the student post-processes its logits; its loss goes through the "
                          "model's own [batch, seq, vocab] logits (more memory)")
        # a tuple hides the teacher from nn.Module: not a submodule, so not in state_dict(),
        # parameters() (the optimizer, DDP) or .to()/.train()
        self._teacher: tuple = ()
        self.teacher_plain = False
        self._teacher_head: tuple = ()
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            self._teacher = (teacher,)
            self.teacher_plain = head_is_plain(teacher)
            if self.teacher_plain:  # float32 once: V x H_t x 4 bytes, instead of an upcast per block
                head = teacher.get_output_embeddings()
                self._teacher_head = (head.weight.detach().float(),
                                      None if head.bias is None else head.bias.detach().float())
            else:
                warnings.warn("the teacher post-processes its logits; KD goes through its own "
                              "[batch, seq, vocab] logits (more memory)")

    @property
    def teacher(self):
        return self._teacher[0] if self._teacher else None

    def flops_per_token(self, seq_len: int) -> tuple[int, int]:
        """(student training, teacher forward) model FLOPs per token."""
        teacher = self.teacher
        return (flops_per_token(self.student, seq_len, training=True),
                flops_per_token(teacher, seq_len, training=False) if teacher is not None else 0)

    def flops_formula(self, seq_len: int) -> dict:
        formula = {"student": flops_formula(self.student, seq_len, training=True)}
        if self.teacher is not None:
            formula["teacher"] = flops_formula(self.teacher, seq_len, training=False)
        return formula

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        # position i predicts token i + 1; the last position of each row predicts nothing
        targets = F.pad(input_ids[:, 1:], (0, 1), value=IGNORE).reshape(-1)  # (B*T,)
        n_targets = B * (T - 1)
        s_in, s_weight, s_bias = _features(self.student, self.student_plain, input_ids)
        teacher = self.teacher
        t_in = t_weight = t_bias = None
        if teacher is not None:
            with torch.no_grad():
                t_in, _, _ = _features(teacher, self.teacher_plain, input_ids)  # (B*T, H_t)
            if self.teacher_plain:
                t_weight, t_bias = self._teacher_head
        total, lm, kd = BlockedHeadLoss.apply(
            s_in, s_weight, s_bias, targets, t_in, t_weight, t_bias,
            self.weight if teacher is not None else 0.0, self.temperature, self.chunk_tokens,
            torch.is_grad_enabled())
        return torch.stack([total, lm, kd]) / n_targets

    def lm_loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The student's mean next-token loss alone (held-out evaluation): no teacher pass."""
        teacher, self._teacher = self._teacher, ()
        try:
            return self(input_ids)[1]
        finally:
            self._teacher = teacher


def build_objective(student, cfg, device) -> Objective:
    """The training loop's objective for a TrainConfig: activation checkpointing, the teacher."""
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(student)
    if not cfg.kd:
        return Objective(student, chunk_tokens=cfg.loss_chunk_tokens)
    return Objective(student, teacher=load_teacher(cfg.kd.teacher, device), weight=cfg.kd.weight,
                     temperature=cfg.kd.temperature, chunk_tokens=cfg.loss_chunk_tokens)


def _features(model, plain: bool, input_ids: torch.Tensor):
    """(B*T, H) hidden states + LM head weight and bias, or (B*T, V) logits + None, None."""
    if plain:
        hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, H)
        head = model.get_output_embeddings()
        return hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias
    logits = model(input_ids=input_ids, use_cache=False).logits  # (B, T, V): the fallback
    return logits.reshape(-1, logits.shape[-1]), None, None


class BlockedHeadLoss(torch.autograd.Function):
    """Summed losses over N positions, one block of `chunk` positions at a time, in float32:
    (total, LM, KL) with total = (1 - w) LM + w KL (w = 0: no teacher), only total
    differentiable. s_in: (N, H) student hidden states, or (N, V) logits when s_weight is None;
    t_in likewise for the teacher, or None. Targets equal to IGNORE count in no sum."""

    @staticmethod
    def forward(ctx, s_in, s_weight, s_bias, targets, t_in, t_weight, t_bias, weight: float,
                temperature: float, chunk: int, need_grad: bool):
        grad_in = torch.empty_like(s_in) if need_grad and s_in.requires_grad else None
        grad_w = (torch.zeros(s_weight.shape, dtype=torch.float32, device=s_in.device)
                  if need_grad and s_weight is not None and s_weight.requires_grad else None)
        grad_b = (torch.zeros(s_bias.shape, dtype=torch.float32, device=s_in.device)
                  if need_grad and s_bias is not None and s_bias.requires_grad else None)
        w32 = None if s_weight is None else s_weight.float()
        lm_sum = kd_sum = None
        with torch.autocast(s_in.device.type, enabled=False):  # the head and softmax in float32
            for a in range(0, s_in.shape[0], chunk):
                x = s_in[a:a + chunk].float()  # (n, H) or (n, V)
                logits = x if w32 is None else F.linear(x, w32, None if s_bias is None else s_bias.float())
                t_logits = None
                if t_in is not None:
                    t_block = t_in[a:a + chunk].float()
                    t_logits = t_block if t_weight is None else F.linear(
                        t_block, t_weight.float(), None if t_bias is None else t_bias.float())
                lm, kd, dlogits = _block(logits, targets[a:a + chunk], t_logits, weight, temperature,
                                         need_grad)
                lm_sum = lm if lm_sum is None else lm_sum + lm
                kd_sum = kd if kd_sum is None else kd_sum + kd
                if grad_in is not None:
                    grad_in[a:a + chunk] = dlogits if w32 is None else dlogits @ w32  # (n, H)
                if grad_w is not None:
                    grad_w.addmm_(dlogits.T, x)  # (V, H)
                if grad_b is not None:
                    grad_b += dlogits.sum(0)
        ctx.grads = (grad_in, grad_w, grad_b)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (s_in, s_weight, s_bias))
        total = lm_sum.clone() if t_in is None else (1.0 - weight) * lm_sum + weight * kd_sum
        ctx.mark_non_differentiable(lm_sum, kd_sum)
        return total, lm_sum, kd_sum

    @staticmethod
    def backward(ctx, g_total, g_lm, g_kd):
        grads = [None if g is None else (g * g_total).to(dtype) for g, dtype in zip(ctx.grads, ctx.dtypes)]
        ctx.grads = None
        return (*grads, None, None, None, None, None, None, None, None)


def _block(logits, targets, t_logits, weight: float, temperature: float, need_grad: bool):
    """One block: summed CE, summed tau^2 KL, and d(total)/d(logits) (None without need_grad).
    logits (n, V) float32, targets (n,), t_logits (n, V_t) float32 or None."""
    valid = targets != IGNORE  # (n,)
    logp = torch.log_softmax(logits, dim=-1)  # (n, V)
    lm = F.nll_loss(logp, targets, ignore_index=IGNORE, reduction="sum")
    kd = lm.new_zeros(())
    grad = None
    if need_grad:  # d CE / d logits = softmax - one-hot
        grad = logp.exp()
        rows = torch.arange(len(targets), device=targets.device)[valid]
        grad[rows, targets[valid]] -= 1.0
        grad.masked_fill_(~valid[:, None], 0.0)
    if t_logits is None:
        return lm, kd, grad
    vocab = min(t_logits.shape[-1], logits.shape[-1])  # a padded teacher vocabulary: shared ids
    t_logp = torch.log_softmax(t_logits[:, :vocab] / temperature, dim=-1)  # (n, V)
    t_p = t_logp.exp()
    s_logp = logp if temperature == 1.0 else torch.log_softmax(logits / temperature, dim=-1)
    kl = (t_p * (t_logp - s_logp[:, :vocab])).sum(-1)  # (n,) per-token KL(p_t || p_s)
    kd = kl.masked_fill(~valid, 0.0).sum() * temperature**2
    if need_grad:  # d tau^2 KL / d logits = tau * (softmax(logits / tau) - p_t)
        g_kd = s_logp.exp()
        g_kd[:, :vocab] -= t_p
        g_kd.mul_(temperature).masked_fill_(~valid[:, None], 0.0)
        grad = (1.0 - weight) * grad + weight * g_kd
    return lm, kd, grad


@torch.no_grad()
def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass (HF's own switch;
    non-reentrant, which DDP and our per-block checkpoints need)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# ---------------------------------------------------------------- the teacher


def check_teacher(path: str, tokenizer, seq_len: int) -> None:
    """Fail before any work when the teacher cannot distil into this student: no checkpoint,
    another tokenizer (different token ids make a per-token KL meaningless), too short a
    context, or a vocabulary the student's token ids overflow."""
    from transformers import AutoConfig

    from miniplm import io
    from miniplm.models import context_length
    from miniplm.models import check_vocab, is_tokenizer_dir, load_tokenizer, tokenizer_fingerprint

    if not io.exists(io.join(path, "config.json")):
        raise ValueError(f"kd.teacher: no HF checkpoint (config.json) at {path}")
    if not is_tokenizer_dir(path):
        raise ValueError(f"kd.teacher: {path} holds no tokenizer (tokenizer_config.json), so it "
                         "cannot be checked against the student's; save the teacher's tokenizer "
                         "beside it (tokenizer.save_pretrained)")
    ours, theirs = tokenizer_fingerprint(tokenizer), tokenizer_fingerprint(load_tokenizer(path))
    if ours != theirs:
        raise ValueError(f"kd.teacher: {path} uses another tokenizer than the student's "
                         f"(fingerprints {theirs} vs {ours}); token-level KD compares the two "
                         "models' distributions over the same token ids, so they must share one. "
                         "Train the student with the teacher's tokenizer (model.tokenizer), or use "
                         "MiniPLM's data selection, which works across tokenizers")
    config = AutoConfig.from_pretrained(io.local_copy(io.join(path, "config.json")))
    check_vocab(config, tokenizer, "kd.teacher")
    context = context_length(config.get_text_config())
    if context is not None and seq_len > context:
        raise ValueError(f"kd.teacher: data.seq_len {seq_len} exceeds the teacher's context {context}")


def load_teacher(path: str, device):
    """The frozen teacher on this worker: eval mode, no gradients, bf16 on GPU (float32 on CPU)."""
    from miniplm.models import load_model

    teacher = load_model(path, device=device.type, dtype="auto").to(device)
    return teacher.eval().requires_grad_(False)
