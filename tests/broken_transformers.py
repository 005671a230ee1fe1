"""Broken variants of the transformers runtime, each one real bug class the runtime groups must catch.

Name them as ``broken_transformers:SilentlyTruncatesBackend`` with this directory on sys.path.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import numpy as np

from pytest_longctx.backends.transformers_backend import TransformersBackend, TransformersRuntime


class SilentlyTruncates(TransformersRuntime):
    """Capacity contract: a prompt past the context is cut to what fits, without an error
    (what a wrapper that clips its input to max_length does)."""

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        room = self.context_limit - self.positions()
        if room <= 0 and self._logits is not None:
            return self._logits.copy()  # nothing fits: the prompt is dropped, the last logits returned
        return super().prefill(np.asarray(token_ids)[:room])


class ChunkPositionsRestart(TransformersRuntime):
    """Chunked prefill differs from one-shot: every forward pass's RoPE positions start at 0
    (position_ids built from the chunk alone), while the cache and mask carry on."""

    def _positions_of(self, at: int, n: int) -> Dict[str, Any]:
        return {"position_ids": self._torch.arange(n, device=self.device).unsqueeze(0)}


def _backend(runtime_class: type) -> type:
    return type(runtime_class.__name__ + "Backend", (TransformersBackend,), {"runtime_class": runtime_class})


SilentlyTruncatesBackend = _backend(SilentlyTruncates)
ChunkPositionsRestartBackend = _backend(ChunkPositionsRestart)
