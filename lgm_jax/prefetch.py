"""Run a function over items a few ahead, in background threads. A leaf module.

The host reads, decodes and transfers the next batches while the device runs this one: the
distillation loop, the streamed probe and the benchmarks all use this one helper.
"""

from __future__ import annotations

import collections
import concurrent.futures


def prefetch_map(fn, items, depth: int, workers: int = 1):
    """fn(x) for x in items, in order, computed up to `depth` items ahead by `workers` background
    threads (the host reads, decodes and transfers the next batches while the device runs this
    one). Stopping the iteration early cancels what has not started."""
    items = iter(items)
    end = object()
    with concurrent.futures.ThreadPoolExecutor(max(workers, 1), thread_name_prefix="load") as pool:
        queue = collections.deque(pool.submit(fn, x) for _, x in zip(range(max(depth, 1)), items))
        try:
            while queue:
                out = queue.popleft().result()
                nxt = next(items, end)
                if nxt is not end:
                    queue.append(pool.submit(fn, nxt))
                yield out
        finally:
            for f in queue:
                f.cancel()
