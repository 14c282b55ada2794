"""Training input: the order in which each worker reads the token cache, one pass at a time.

No global shuffle and no Ray Data pass per epoch: a pass is a seeded permutation of the
cache's parts, dealt to the workers round-robin; each worker reads its parts a window of
`shuffle_window` parts at a time and permutes the window's sequences with a seed of its own.
Everything follows from (seed, pass, the cache manifest), so

- every pass sees a different order, and the same one on a re-run;
- a resumed run jumps to its position: whole windows before it are skipped by their row
  counts (from the manifest) without being read, and only the window it stops in is loaded;
- memory is bounded by one window (plus the next, prefetched), never by the corpus.

Workers take the same number of micro-batches per pass (the least any worker has), so DDP
ranks stay in step; the few sequences past that are left out of that pass only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from miniplm.data.tokens import part_sequences
from miniplm.prefetch import prefetched


@dataclasses.dataclass(frozen=True)
class PartWindow:
    parts: tuple[str, ...]
    rows: int
    index: int  # the window's number in its pass, which seeds its permutation


class CacheSampler:
    def __init__(self, root: str, manifest: dict, *, seed: int, rank: int, world: int,
                 window: int, micro_batch: int):
        self.root, self.seed, self.rank, self.world = root, seed, rank, world
        self.window, self.micro_batch = window, micro_batch
        self.parts = [(p["name"], p["rows"]) for p in manifest["parts"] if p["rows"]]
        if len(self.parts) < world:
            raise ValueError(f"the token cache {root} has {len(self.parts)} non-empty parts, fewer "
                             f"than the {world} workers: prepare the corpus with a smaller rows_per_part")
        self.rows_read = 0  # sequences loaded from storage by this sampler (resume skips, not reads)

    def windows(self, epoch: int, rank: int) -> list[PartWindow]:
        """This pass's windows for `rank`: its share of a seeded permutation of the parts."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.parts))
        mine = [self.parts[i] for i in order[rank::self.world]]
        chunks = [mine[i:i + self.window] for i in range(0, len(mine), self.window)]
        return [PartWindow(tuple(n for n, _ in c), sum(r for _, r in c), k) for k, c in enumerate(chunks)]

    def batches_per_pass(self, epoch: int) -> int:
        """Micro-batches every rank takes this pass: the least any rank can fill."""
        return min(sum(w.rows for w in self.windows(epoch, r)) // self.micro_batch
                   for r in range(self.world))

    def load(self, epoch: int, window: PartWindow) -> np.ndarray:
        """A window's sequences, permuted with a seed of (run seed, pass, rank, window)."""
        seqs = np.concatenate([part_sequences(self.root, name) for name in window.parts])
        self.rows_read += len(seqs)
        rng = np.random.default_rng([self.seed, epoch, self.rank, window.index])
        return seqs[rng.permutation(len(seqs))]

    def epoch_batches(self, epoch: int, start: int = 0):
        """(micro_batch, seq_len) int64 arrays of pass `epoch`, from micro-batch `start` on."""
        n_batches = self.batches_per_pass(epoch)
        if n_batches == 0:
            raise RuntimeError("train: a worker's share of the corpus holds less than one micro-batch")
        first_row, end_row = start * self.micro_batch, n_batches * self.micro_batch
        todo, offset = [], 0
        for w in self.windows(epoch, self.rank):
            if offset + w.rows > first_row and offset < end_row:
                todo.append((w, offset))
            offset += w.rows
        carry = np.zeros((0, 0), dtype=np.int32)
        loaded = prefetched((self.load(epoch, w) for w, _ in todo), depth=1)  # the next loads meanwhile
        for (w, offset), seqs in zip(todo, loaded):
            lo, hi = max(0, first_row - offset), min(w.rows, end_row - offset)
            rows = seqs[lo:hi] if not len(carry) else np.concatenate([carry, seqs[lo:hi]])
            full = len(rows) // self.micro_batch * self.micro_batch
            for b in range(0, full, self.micro_batch):
                yield rows[b:b + self.micro_batch].astype(np.int64)
            carry = rows[full:]
