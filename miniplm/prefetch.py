"""Iterating ahead in a background thread: the scorer builds its next batches while the model
runs, and a training worker reads its next window of the token cache while it trains."""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Iterable, Iterator

_END = object()


def prefetched(items: Iterable, depth: int) -> Iterator:
    """Iterate `items`, producing up to `depth` of them ahead in one background thread (numpy,
    torch and Parquet reads release the GIL, so producing overlaps the consumer's work). Held at
    once: the item being consumed and `depth` more. A producer's error is raised here."""
    if depth < 1:
        yield from items
        return
    source = iter(items)
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
    ahead: collections.deque = collections.deque(pool.submit(next, source, _END) for _ in range(depth))
    try:
        while True:
            item = ahead.popleft().result()
            if item is _END:
                return
            ahead.append(pool.submit(next, source, _END))
            yield item
    finally:  # the consumer stopped early or failed: start nothing more
        pool.shutdown(wait=True, cancel_futures=True)
