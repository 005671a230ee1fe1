"""A whole-model run's prompt and its prefill: seeded token ids, prefilled in chunks, then
one token at a time for the tail logits. Shared by the runtime equivalence group and
``longctx-logits``, so that the golden file and the run under test ask the same question."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from .inputs import seed_for


def token_ids(seed: int, vocab_size: int, n: int) -> np.ndarray:
    """The run's prompt: n token ids drawn uniformly from the vocabulary with the run's seed."""
    rng = np.random.default_rng(seed_for(seed, "runtime-tokens"))
    return rng.integers(0, vocab_size, size=n, dtype=np.int64).astype(np.int32)


# One prefill call: token ids in, the last position's logits out. The suite passes its
# guarded call (one-line failures, shape and NaN checks); the command passes its own.
Prefill = Callable[[Sequence[int]], Optional[np.ndarray]]


def prefill_chunks(prefill: Prefill, ids: Sequence[int], chunk: int) -> Optional[np.ndarray]:
    """Prefill ids in chunks of ``chunk``; the logits the last chunk returned."""
    logits = None
    for start in range(0, len(ids), chunk):
        logits = prefill(ids[start:start + chunk])
    return logits


def tail_logits(prefill: Prefill, ids: Sequence[int], tail: int, chunk: int) -> np.ndarray:
    """From an empty context: prefill ids[:-tail] in chunks, then one token at a time.

    Returns (tail, vocab): row i holds the logits after ids[: len(ids) - tail + i + 1].
    """
    head = len(ids) - tail
    if head > 0:
        prefill_chunks(prefill, ids[:head], chunk)
    return np.stack([np.asarray(prefill(ids[i:i + 1])) for i in range(head, len(ids))])
