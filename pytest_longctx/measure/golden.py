"""Golden logits: what a float reference run of a model gives for seeded token ids.

A whole-model runtime's accuracy is judged against the logits of the same
model and the same tokens from a float reference run (llama.cpp on float32
weights with a float32 KV cache, or the model's own framework). The file
carries its token ids, so every runtime is asked the same question, and at
each depth the logits of the last ``tail`` positions: the context is
prefilled to ``depth - tail`` and then one token at a time, each call giving
the next-token logits. ``longctx-logits`` writes such a file from any runtime
that returns logits; the equivalence group reads it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import numpy as np

from ..errors import SpecError

FORMAT = "pytest-longctx golden logits 1"
TAIL = 16


@dataclass
class GoldenLogits:
    """A golden-logits file: its token ids, depths and the tail logits at each depth."""

    path: str
    tokens: np.ndarray  # int32 (max depth,)
    depths: List[int]
    tail: int
    logits: np.ndarray  # float32 (len(depths), tail, vocab)
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return int(self.logits.shape[-1])

    def at(self, depth: int) -> np.ndarray:
        return self.logits[self.depths.index(depth)]


def write(path: str, tokens: np.ndarray, depths: Sequence[int], tail: int, logits: np.ndarray,
          meta: Dict[str, Any]) -> None:
    with open(path, "wb") as f:
        np.savez_compressed(f, format=np.array(FORMAT), tokens=np.asarray(tokens, np.int32),
                            depths=np.asarray(depths, np.int64), tail=np.array(tail),
                            logits=np.asarray(logits, np.float32), meta=np.array(json.dumps(meta)))


def load(path: str) -> GoldenLogits:
    """Read and check a golden-logits file; anything wrong is a one-line SpecError naming it."""
    def bad(what: str) -> SpecError:
        return SpecError(f"reference logits {path}: {what}")

    if not os.path.isfile(path):
        raise bad("no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            content = {key: data[key] for key in data.files}
    except Exception as exc:
        raise bad(f"not a file written by longctx-logits ({type(exc).__name__}: {exc})") from None
    if str(content.get("format", "")) != FORMAT:
        raise bad(f"format is {str(content.get('format', 'missing'))!r}, but should be {FORMAT!r}")
    tokens, depths = content["tokens"], [int(d) for d in content["depths"]]
    tail, logits = int(content["tail"]), content["logits"]
    if logits.ndim != 3 or logits.shape[:2] != (len(depths), tail):
        raise bad(f"logits of shape {logits.shape}, but should be ({len(depths)}, {tail}, vocab)")
    if not depths or max(depths) > tokens.size or min(depths) < tail:
        raise bad(f"depths {depths} do not fit {tokens.size} tokens with a tail of {tail}")
    if not np.all(np.isfinite(logits)):
        raise bad("logits hold NaN or Inf")
    return GoldenLogits(path, tokens, depths, tail, logits, json.loads(str(content["meta"])))
