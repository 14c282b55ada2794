"""Summed log-probabilities of texts under a causal LM, efficiently and exactly.

A text's token ids `x_1..x_n` are scored as `sum_i log p(x_i | x_<i)` with the model's BOS
(or EOS where it has none) prepended, so `x_1` is scored too. A sequence longer than the
context is split into overlapping windows: each window re-reads at least
`max_length - stride` tokens of context and scores only the tokens it adds.

Windows are grouped into micro-batches under a token budget, longest first, in one of two
layouts (`packing`):
  padded  rows of windows right-padded to the longest, with an attention mask (fastest on
          CPU and with sdpa: attention cost stays per window)
  packed  all windows in one row, `position_ids` restarting per window, no mask and no
          cache, so the model's varlen kernels (flash attention) keep windows apart and
          no padded token is computed
The LM head runs only at scored positions, in chunks of 512 positions by a vocabulary block of
at most 32 MB of float32 logits (the head weight upcast one block at a time), so
`[batch, seq, vocab]` logits never exist in any dtype and the head's memory is the same
whatever the vocabulary and batch (small blocks also stay in cache on CPU). Models
that post-process their logits (soft-capping, scaling) keep the model's own logits, a few
rows at a time. Per-window sums are reduced on the host in a fixed order, so a table is
bit-identical however often it is recomputed, on GPU too. No Ray here: the score stage
wires this into an actor pool.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch

from miniplm.models import head_is_plain
from miniplm.prefetch import prefetched

PACKING = ("auto", "padded", "packed")
# attention implementations that run packed rows as separate sequences without a T x T mask
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


@dataclasses.dataclass(frozen=True)
class Window:
    row: int          # which text in the batch
    start: int        # window = seq[start:end] of the prefixed sequence
    end: int
    first_target: int  # first position of seq this window scores (earlier ones are context)


def windows(seq_len: int, max_length: int, stride: int, row: int = 0) -> list[Window]:
    """Windows covering targets 1..seq_len-1 of a prefixed sequence, each target once."""
    end = min(max_length, seq_len)
    out = [Window(row, 0, end, 1)]
    while end < seq_len:
        new_end = min(end + stride, seq_len)
        out.append(Window(row, new_end - max_length, new_end, end))
        end = new_end
    return out


def pack_by_tokens(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group indices into batches whose padded size (rows x longest) stays within
    `batch_tokens`; longest first, so padding is small and the first batch shows peak memory."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def pack_flat(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group indices into batches whose summed length stays within `batch_tokens` (packed
    rows have no padding); longest first, so the first batch shows peak memory."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    used = 0
    for i in order:
        if batches and used + lengths[i] <= batch_tokens:
            batches[-1].append(i)
            used += lengths[i]
        else:
            batches.append([i])
            used = lengths[i]
    return batches


def default_packing(model) -> str:
    """Packed rows where the attention kernel takes variable-length sequences; elsewhere a
    packed row would get a dense block-diagonal mask over the whole row, which costs more
    than the padding it saves."""
    impl = getattr(model.config, "_attn_implementation", None)
    on_gpu = next(model.parameters()).device.type == "cuda"
    return "packed" if on_gpu and impl in VARLEN_ATTENTION else "padded"


@dataclasses.dataclass
class MicroBatch:
    """One forward pass, built on the host (pinned on GPU machines) ahead of its turn."""
    input_ids: torch.Tensor             # (B, T)
    attention_mask: torch.Tensor | None  # (B, T), padded layout only
    position_ids: torch.Tensor | None   # (1, T), packed layout only
    positions: torch.Tensor             # (P,) flat index into B*T of each scored token's logits
    targets: torch.Tensor               # (P,) the token each of those positions predicts
    owner: np.ndarray                   # (P,) which window of this batch each scored token is in
    texts: np.ndarray                   # (W,) which text each window belongs to


class SequenceScorer:
    """Scores token-id sequences with one loaded model."""

    def __init__(self, model, *, max_length: int, stride: int, batch_tokens: int,
                 prefix_id: int, packing: str = "auto", head_chunk_tokens: int = 512,
                 head_chunk_bytes: int = 32 << 20, prefetch: int = 2):
        if not 1 <= stride < max_length:
            raise ValueError(f"stride must be in [1, max_length), got {stride} with max_length {max_length}")
        if packing not in PACKING:
            raise ValueError(f"packing must be one of {', '.join(PACKING)}, got {packing!r}")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.max_length, self.stride, self.batch_tokens = max_length, stride, batch_tokens
        self.prefix_id, self.prefetch = prefix_id, prefetch
        self.head_chunk_tokens, self.head_chunk_bytes = head_chunk_tokens, head_chunk_bytes
        self.lm_head = model.get_output_embeddings()
        with torch.inference_mode():
            self.chunked_head = head_is_plain(model)
        if not self.chunked_head:
            warnings.warn("the model post-processes its logits (or its head is no plain linear layer): "
                          "scoring with full logits (more memory)")
        self.packing = default_packing(model) if packing == "auto" else packing

    @torch.inference_mode()
    def score(self, sequences: list[np.ndarray]) -> np.ndarray:
        """float64 summed log-probability of every sequence (text ids, no prefix)."""
        full = [np.concatenate([[self.prefix_id], np.asarray(s, dtype=np.int64)]) for s in sequences]
        wins = [w for row, seq in enumerate(full)
                for w in windows(len(seq), self.max_length, self.stride, row)]
        packed = self.packing == "packed" and self.chunked_head  # model logits come in rows
        plan = (pack_flat if packed else pack_by_tokens)([w.end - w.start for w in wins],
                                                         self.batch_tokens)
        build = self._build_packed if packed else self._build_padded
        batches = (build([wins[i] for i in indices], full) for indices in plan)
        # the next batches are built on the host while the model runs this one; results stay
        # on the device until the end, so nothing waits for the device batch by batch
        scored = [(batch, self._token_logprobs(batch)) for batch in prefetched(batches, self.prefetch)]
        if not scored:
            return np.zeros(0, dtype=np.float64)
        token_lp = torch.cat([lp for _, lp in scored]).double().cpu().numpy()
        totals = np.zeros(len(sequences), dtype=np.float64)
        start = 0
        for batch, lp in scored:
            # per-window sums on the host, sequential float64 additions in a fixed order:
            # deterministic on every device (index_add_ on CUDA is not), and on CPU the same
            # additions in the same order as the index_add_ this replaced
            sums = np.zeros(len(batch.texts), dtype=np.float64)
            np.add.at(sums, batch.owner, token_lp[start:start + len(lp)])
            np.add.at(totals, batch.texts, sums)
            start += len(lp)
        return totals

    # ------------------------------------------------------------ building micro-batches

    def _build_padded(self, wins: list[Window], full: list[np.ndarray]) -> MicroBatch:
        longest = max(w.end - w.start for w in wins)
        ids = torch.zeros(len(wins), longest, dtype=torch.long)
        mask = torch.zeros(len(wins), longest, dtype=torch.long)
        for b, w in enumerate(wins):
            ids[b, : w.end - w.start] = torch.from_numpy(full[w.row][w.start:w.end])
            mask[b, : w.end - w.start] = 1
        offsets = np.arange(len(wins)) * longest
        return self._finish(wins, full, ids, mask, None, offsets)

    def _build_packed(self, wins: list[Window], full: list[np.ndarray]) -> MicroBatch:
        lengths = np.array([w.end - w.start for w in wins])
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        ids = torch.from_numpy(np.concatenate([full[w.row][w.start:w.end] for w in wins]))[None]
        positions = np.arange(int(lengths.sum())) - np.repeat(offsets, lengths)  # restart per window
        return self._finish(wins, full, ids, None, torch.from_numpy(positions)[None], offsets)

    def _finish(self, wins, full, ids, mask, position_ids, offsets) -> MicroBatch:
        """Scored positions: logits at window position j predict seq position start + j + 1."""
        positions, targets, owner = [], [], []
        for b, w in enumerate(wins):
            cols = np.arange(w.first_target - w.start - 1, w.end - w.start - 1)
            positions.append(offsets[b] + cols)
            targets.append(full[w.row][w.start + cols + 1])
            owner.append(np.full(len(cols), b))
        batch = MicroBatch(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                           positions=torch.from_numpy(np.concatenate(positions)),
                           targets=torch.from_numpy(np.concatenate(targets)),
                           owner=np.concatenate(owner), texts=np.array([w.row for w in wins]))
        if self.device.type == "cuda":  # page-locked: the copy to the GPU runs asynchronously
            for name in ("input_ids", "attention_mask", "position_ids", "positions", "targets"):
                tensor = getattr(batch, name)
                if tensor is not None:
                    setattr(batch, name, tensor.pin_memory())
        return batch

    # ------------------------------------------------------------ the forward pass

    def _to_device(self, tensor):
        return None if tensor is None else tensor.to(self.device, non_blocking=True)

    def _token_logprobs(self, batch: MicroBatch) -> torch.Tensor:
        """(P,) float32 log-probabilities of the batch's scored tokens, on the device."""
        ids = self._to_device(batch.input_ids)
        positions, targets = self._to_device(batch.positions), self._to_device(batch.targets)
        if not self.chunked_head:
            return self._model_logits_logprobs(ids, self._to_device(batch.attention_mask),
                                               positions, targets)
        inputs = {"input_ids": ids, "attention_mask": self._to_device(batch.attention_mask)}
        if batch.position_ids is not None:
            # packed: no mask and no cache, so attention stays within each window
            inputs = {"input_ids": ids, "position_ids": self._to_device(batch.position_ids)}
        hidden = self.model.base_model(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
        hidden = hidden.reshape(-1, hidden.shape[-1])[positions]  # (P, H): scored positions only
        out = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        for i in range(0, len(targets), self.head_chunk_tokens):
            part = slice(i, i + self.head_chunk_tokens)
            out[part] = self._head_logprobs(hidden[part], targets[part])
        return out

    def _head_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log softmax(lm_head(hidden))[target] in float32, one vocabulary block at a time:
        (p, H), (p,) -> (p,). Memory: p x block logits and one block of the weight in fp32."""
        weight, bias = self.lm_head.weight, self.lm_head.bias
        hidden = hidden.float()
        vocab = weight.shape[0]
        block = max(1, self.head_chunk_bytes // (4 * self.head_chunk_tokens))
        if block >= vocab:
            logits = torch.nn.functional.linear(hidden, weight.float(), _float(bias))  # (p, V)
            return _logprob_of(logits, targets)
        picked = torch.zeros(len(targets), dtype=torch.float32, device=hidden.device)
        lse = []
        for v0 in range(0, vocab, block):
            bias_block = None if bias is None else bias[v0:v0 + block]
            logits = torch.nn.functional.linear(hidden, weight[v0:v0 + block].float(),
                                                _float(bias_block))  # (p, block)
            lse.append(torch.logsumexp(logits, dim=-1))
            local = (targets - v0).clamp(0, logits.shape[1] - 1)
            inside = (targets >= v0) & (targets < v0 + logits.shape[1])
            picked = torch.where(inside, logits.gather(1, local[:, None]).squeeze(1), picked)
        return picked - torch.logsumexp(torch.stack(lse, dim=1), dim=1)

    def _model_logits_logprobs(self, ids, mask, positions, targets) -> torch.Tensor:
        """Fallback for models that post-process logits: the model's own `[rows, T, V]`
        logits, a few rows at a time so they stay within `head_chunk_bytes`."""
        rows, length = ids.shape
        vocab = self.model.config.get_text_config().vocab_size
        step = max(1, self.head_chunk_bytes // (4 * length * vocab))
        bounds = torch.searchsorted(positions, torch.arange(0, rows + step, step, device=ids.device) * length)
        out = torch.empty(len(targets), dtype=torch.float32, device=ids.device)
        for k, r0 in enumerate(range(0, rows, step)):
            lo, hi = int(bounds[k]), int(bounds[k + 1])
            logits = self.model(input_ids=ids[r0:r0 + step], attention_mask=mask[r0:r0 + step],
                                use_cache=False).logits  # (step, T, V)
            picked = logits.reshape(-1, logits.shape[-1])[positions[lo:hi] - r0 * length]
            out[lo:hi] = _logprob_of(picked.float(), targets[lo:hi])
        return out


def _float(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.float()


def _logprob_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row, fp32: (P, V), (P,) -> (P,). Cross-entropy's fused
    log-softmax: on CPU about a third faster than gather minus logsumexp, which makes extra
    passes over the logits."""
    return -torch.nn.functional.cross_entropy(logits, targets, reduction="none")
