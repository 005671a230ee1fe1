"""The protocols a backend implements, and what it says about itself.

Two kinds of backend: a ``KVBackend`` hands out its KV cache (a kernel library,
a CPU engine); a ``RuntimeBackend`` runs a whole model file and is seen only
through token ids, logits and its own statistics (an NPU runtime, llama.cpp).
A backend depends on this module, the specs and the errors; never on the suite.

A backend class may also declare ``device_aliases``, a mapping from a device-kind
alias (``DEVICE_KINDS``) to the options that put it on that kind of device, e.g.
``{"cpu": {}, "npu": {"device": "NPU"}}``: ``--longctx-backend=npu`` then tries it,
after the built-ins, when it is registered under the entry-point group
``pytest_longctx.backends``. It is read from the class, before construction, so
it is not part of the protocols below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

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
    # Cache lengths the backend can hold come in multiples of this (a paged or tiled layout);
    # --longctx-context-step must be a multiple of it.
    position_granularity: int = 1


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
        """A host array moved to the backend's native array type (outside timed regions).

        Of a native array the suite uses only ``shape`` and basic slicing along the first
        axis (``x[i:j]``, what torch, CuPy and OpenVINO tensors all offer); everything
        else, copying included, goes through ``to_numpy``.
        """

    def to_numpy(self, native: Any) -> np.ndarray:
        """A native array copied back to the host."""

    def synchronize(self) -> None:
        """Wait until queued device work is done, so that timers stop at the right time."""

    def memory_in_use(self) -> Optional[int]:
        """Device memory this process holds, None for host backends. Count this process only
        (an allocator's own statistics, not the device's free memory): pytest-xdist workers
        share one device, and a device-wide count would charge a cache with its neighbours'."""


@dataclass(frozen=True)
class DeviceBandwidth:
    """What a device backend's optional ``bandwidth()`` measured: the suite's roofline for it
    (copy counts bytes read and written; read is a streaming read)."""

    copy_gbps: float
    read_gbps: float
    nbytes: int
    method: str


@dataclass(frozen=True)
class RuntimeStats:
    """What a runtime counted since it was opened (``reset()`` does not clear it)."""

    prefill_seconds: float = 0.0
    prefill_tokens: int = 0
    generate_seconds: float = 0.0
    generate_tokens: int = 0
    # Peak resident memory as the runtime itself reports it; None when it does not.
    peak_memory_bytes: Optional[int] = None


@runtime_checkable
class ModelRuntime(Protocol):
    """One loaded model with its context; prompts extend the context until ``reset()``."""

    model_context_limit: Optional[int]  # baked into the model file; None when the file does not say
    context_limit: int  # this instance's effective limit
    kv_spec: CacheSpec  # the model's KV geometry and KV dtype, max_positions = context_limit
    vocab_size: int

    def prefill(self, token_ids: Sequence[int]) -> Optional[np.ndarray]:
        """Extend the context by these tokens; the logits of the last position (vocab_size,),
        or None only when the runtime cannot return logits.

        A prompt that would pass context_limit raises ContextLimitExceeded and must
        leave the context as it was; an error state of the runtime raises RuntimeFailure.
        """

    def generate(self, n: int) -> List[int]:
        """Greedy-decode n tokens after the context, extending it by n."""

    def positions(self) -> int:
        """Positions the context holds now."""

    def reset(self) -> None:
        """Empty the context (clear the KV cache); the model stays loaded."""

    def stats(self) -> RuntimeStats:
        ...

    def close(self) -> None:
        """Unload the model; the runtime is unusable afterwards."""


@runtime_checkable
class RuntimeBackend(Protocol):
    """An inference runtime that loads model files and hides its KV cache."""

    name: str

    def info(self) -> BackendInfo:
        ...

    def open_runtime(self, model: str, context: Optional[int] = None, **options: Any) -> ModelRuntime:
        """Load ``model`` with ``context`` positions (None: the model's own limit).

        A context above the model's limit is refused (ContextLimitExceeded or
        SpecError) or clamped with a ContextClamped warning, never silently
        accepted; a missing or unreadable model file is a SpecError naming the path.
        """
