"""The protocols a backend implements, and what it says about itself.

A backend depends on this module, the specs and the errors; never on the suite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Protocol, Tuple, runtime_checkable

import numpy as np

from .spec import CacheSpec

DEVICE_KINDS = ("cpu", "gpu", "npu")


@dataclass(frozen=True)
class BackendInfo:
    """What a backend reports about itself and the device it runs on."""

    name: str
    device_kind: str
    device_name: str = ""
    vendor: str = ""
    versions: Dict[str, str] = field(default_factory=dict)
    kv_dtypes: Tuple[str, ...] = ()
    max_positions: Optional[int] = None


@runtime_checkable
class KVCache(Protocol):
    """A KV cache of one spec.

    K and V are given pre-RoPE with shape (n, n_kv_heads, head_dim); the cache
    stores K rotated at the absolute positions length .. length+n-1.
    """

    spec: CacheSpec

    def length(self, layer: int) -> int:
        """Positions held by this layer."""

    def append(self, layer: int, k: Any, v: Any) -> None:
        """Store n positions; raise ContextLimitExceeded, changing nothing, past max_positions."""

    def attend(self, layer: int, q: Any) -> Any:
        """Attention of the queries for the last n_q positions, causal and windowed.

        q is pre-RoPE with shape (n_q, n_heads, head_dim); returns (n_q, n_heads, head_dim).
        """

    def read(self, layer: int, start: int, stop: int) -> Tuple[Any, Any]:
        """The stored K (rotated, dequantized) and V of positions start .. stop-1."""

    def nbytes(self) -> int:
        """Bytes the cache holds for K and V as the backend counts them."""

    def close(self) -> None:
        """Release the storage; the cache is unusable afterwards."""


@runtime_checkable
class KVBackend(Protocol):
    """An inference backend seen through its KV cache."""

    name: str

    def info(self) -> BackendInfo:
        ...

    def open_cache(self, spec: CacheSpec) -> KVCache:
        """A fresh, empty cache; raise NotSupported(reason) for a spec it cannot hold."""

    def asarray(self, array: np.ndarray) -> Any:
        """A host array moved to the backend's native array type (outside timed regions)."""

    def to_numpy(self, native: Any) -> np.ndarray:
        """A native array copied back to the host."""

    def synchronize(self) -> None:
        """Wait until queued device work is done, so that timers stop at the right time."""

    def memory_in_use(self) -> Optional[int]:
        """Device memory in use as the device reports it; None for host backends."""
