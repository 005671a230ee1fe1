"""The torch backend with one defect each: the suite must catch them on a real engine too.

``broken_backends`` departs from a NumPy toy; these depart from the shipped torch
backend by one overridden step, so a pass of the suite on ``torch`` means the same
checks that catch these were run against the real kernels (SDPA, float32 RoPE).
Name them as ``broken_torch_backends:TorchFloat16Angles`` with this directory on
``sys.path``.
"""

from __future__ import annotations

from typing import Any, Tuple

from pytest_longctx.backends.torch_backend import RopeRows, TorchBackend, TorchCache


class _Float16Rope(RopeRows):
    def rows(self, start: int, stop: int) -> Tuple[Any, Any]:
        torch = self._torch
        positions = torch.arange(start, stop, device=self.inv_freq.device).half()
        angles = (positions[:, None] * self.inv_freq.half()[None, :]).float()
        cos, sin = torch.cos(angles), torch.sin(angles)
        return cos * self.factor, sin * self.factor


class TorchFloat16Angles(TorchBackend):
    """RoPE angles in float16 (positions and frequencies cast before the product): past 2048
    float16 no longer holds every position (transformers PR 29285, vLLM PR 1004)."""

    name = "torch-float16-angles"

    class Cache(TorchCache):
        Rope = _Float16Rope


class TorchCausalOffByOne(TorchBackend):
    """The chunk path's mask lets a query see the next position (``<=`` row + 1): chunked
    prefill differs from one-shot prefill (vLLM 5952). Decode has no mask and is right."""

    name = "torch-causal-off-by-one"

    class Cache(TorchCache):
        def _visible(self, key_pos: Any, row_pos: Any) -> Any:
            mask = key_pos <= row_pos + 1
            window = self.spec.sliding_window
            return mask & (key_pos > row_pos - window) if window else mask


class TorchStaleSlot(TorchBackend):
    """Attention reads one slot past the length: the slot the next append will fill, stale or
    never written (a kernel's key range ending at ``length + 1``). Decode sees it (no mask);
    a chunk's causal mask hides it; a full cache has no slot past its end."""

    name = "torch-stale-slot"

    class Cache(TorchCache):
        def _key_range(self, first: int, last: int) -> Tuple[int, int]:
            lo, hi = super()._key_range(first, last)
            return lo, min(hi + 1, self.spec.max_positions)
