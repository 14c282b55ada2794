"""Summed log-probabilities of texts under a causal LM, efficiently and exactly.

A text's token ids `x_1..x_n` are scored as `sum_i log p(x_i | x_<i)` with the model's BOS
(or EOS where it has none) prepended, so `x_1` is scored too. A sequence longer than the
context is split into overlapping windows: each window re-reads at least
`max_length - stride` tokens of context and scores only the tokens it adds. Windows of all
texts in a batch are sorted by length and packed under a token budget, and the LM head is
applied only at scored positions, in chunks, so full `[batch, seq, vocab]` fp32 logits never
exist. No Ray here: the score stage wires this into an actor pool.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch


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


def prefix_token_id(tokenizer) -> int:
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a BOS nor an EOS token "
                         "to start sequences with")
    return int(token)


def context_length(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class SequenceScorer:
    """Scores token-id sequences with one loaded model."""

    def __init__(self, model, *, max_length: int, stride: int, batch_tokens: int,
                 prefix_id: int, head_chunk_tokens: int = 4096):
        if not 1 <= stride < max_length:
            raise ValueError(f"stride must be in [1, max_length), got {stride} with max_length {max_length}")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.max_length, self.stride, self.batch_tokens = max_length, stride, batch_tokens
        self.prefix_id, self.head_chunk_tokens = prefix_id, head_chunk_tokens
        self.lm_head = model.get_output_embeddings()
        self.chunked_head = self._chunked_head_matches_model()

    @torch.inference_mode()
    def score(self, sequences: list[np.ndarray]) -> np.ndarray:
        """float64 summed log-probability of every sequence (text ids, no prefix)."""
        full = [np.concatenate([[self.prefix_id], np.asarray(s, dtype=np.int64)]) for s in sequences]
        wins = [w for row, seq in enumerate(full)
                for w in windows(len(seq), self.max_length, self.stride, row)]
        totals = np.zeros(len(sequences), dtype=np.float64)
        for batch in pack_by_tokens([w.end - w.start for w in wins], self.batch_tokens):
            sums = self._score_windows([wins[i] for i in batch], full)
            np.add.at(totals, [wins[i].row for i in batch], sums)
        return totals

    def _score_windows(self, wins: list[Window], full: list[np.ndarray]) -> np.ndarray:
        longest = max(w.end - w.start for w in wins)
        ids = torch.zeros(len(wins), longest, dtype=torch.long)
        mask = torch.zeros(len(wins), longest, dtype=torch.long)
        rows, cols, targets = [], [], []
        for b, w in enumerate(wins):
            seq = full[w.row][w.start:w.end]
            ids[b, : len(seq)] = torch.from_numpy(seq)
            mask[b, : len(seq)] = 1
            # logits at window position j predict seq position start + j + 1
            scored = np.arange(w.first_target - w.start - 1, w.end - w.start - 1)
            rows.append(np.full(len(scored), b))
            cols.append(scored)
            targets.append(seq[scored + 1])
        rows_t = torch.from_numpy(np.concatenate(rows)).to(self.device)
        cols_t = torch.from_numpy(np.concatenate(cols)).to(self.device)
        targets_t = torch.from_numpy(np.concatenate(targets)).to(self.device)
        ids, mask = ids.to(self.device), mask.to(self.device)
        token_lp = self._token_logprobs(ids, mask, rows_t, cols_t, targets_t)  # (P,) fp32
        sums = torch.zeros(len(wins), dtype=torch.float64, device=self.device)
        sums.index_add_(0, rows_t, token_lp.double())
        return sums.cpu().numpy()

    def _token_logprobs(self, ids, mask, rows, cols, targets) -> torch.Tensor:
        if not self.chunked_head:
            logits = self.model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            return _logprob_of(logits[rows, cols].float(), targets)
        hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = hidden[rows, cols]  # (P, H): only the scored positions
        out = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        for i in range(0, len(targets), self.head_chunk_tokens):
            part = slice(i, i + self.head_chunk_tokens)
            out[part] = _logprob_of(self.lm_head(hidden[part]).float(), targets[part])
        return out

    @torch.inference_mode()
    def _chunked_head_matches_model(self) -> bool:
        """Models that post-process logits (soft-capping, scaling) are not `lm_head(hidden)`:
        check once on a short sequence and fall back to the model's own logits if so."""
        if self.lm_head is None or not hasattr(self.model, "base_model"):
            return False
        vocab = self.lm_head.weight.shape[0]
        ids = torch.arange(min(16, self.max_length), device=self.device)[None] % vocab
        try:
            hidden = self.model.base_model(input_ids=ids).last_hidden_state
            ours = self.lm_head(hidden).float()
        except Exception as err:  # an architecture whose base model takes other inputs
            warnings.warn(f"chunked LM head unavailable ({err}); using full logits")
            return False
        theirs = self.model(input_ids=ids).logits.float()
        if not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3):
            warnings.warn("model post-processes its logits; scoring with full logits (more memory)")
            return False
        return True


def _logprob_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row, fp32: (P, V), (P,) -> (P,)."""
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
