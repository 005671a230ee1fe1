"""The argument checks every built-in cache makes, with the suite's one-line messages.

They run before anything is written, so a refused call changes nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np

from pytest_longctx.errors import ContextLimitExceeded
from pytest_longctx.spec import CacheSpec


def layer(spec: CacheSpec, index: int) -> None:
    if not 0 <= index < spec.n_layers:
        raise ValueError(f"layer={index}, but should be in 0..{spec.n_layers - 1}")


def rows(spec: CacheSpec, name: str, array: Any, heads: int) -> None:
    """``array`` must be (n, heads, head_dim)."""
    expected = ("n", heads, spec.head_dim)
    if array.ndim != 3 or tuple(array.shape[1:]) != expected[1:]:
        raise ValueError(f"{name} has shape {tuple(array.shape)}, but should be {expected}")


def append(spec: CacheSpec, index: int, length: int, k: Any, v: Any) -> None:
    """k and v of one append to a layer holding ``length`` positions."""
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"v has {v.shape[0]} positions, but k has {k.shape[0]}")
    if length + k.shape[0] > spec.max_positions:
        raise ContextLimitExceeded(index, length, k.shape[0], spec.max_positions)


def append_inputs(spec: CacheSpec, lengths: Sequence[int], index: int, k: Any, v: Any,
                  as_input: Callable[[str, Any, int], Any]) -> Tuple[Any, Any, int]:
    """The checked (k, v, start) of an append: the layer, both inputs' shapes (``as_input``
    converts to the backend's array type and checks rows), their lengths and the limit."""
    layer(spec, index)
    k, v = as_input("k", k, spec.n_kv_heads), as_input("v", v, spec.n_kv_heads)
    append(spec, index, lengths[index], k, v)
    return k, v, lengths[index]


def queries(n_q: int, length: int) -> None:
    if not 1 <= n_q <= length:
        raise ValueError(f"n_q={n_q}, but should be between 1 and the layer's length {length}")


def read_range(start: int, stop: int, length: int) -> None:
    if not 0 <= start <= stop <= length:
        raise ValueError(f"read({start}, {stop}), but should satisfy 0 <= start <= stop <= {length}")


def token_ids(ids: Sequence[int], vocab_size: Optional[int], dtype: Any) -> np.ndarray:
    """A runtime's prompt: a non-empty 1-D sequence of integers in 0..vocab_size-1 (or what
    ``dtype`` holds when the vocabulary is not known), as a contiguous ``dtype`` array."""
    array = np.asarray(ids)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"token_ids has shape {array.shape}, but should be a non-empty 1-D sequence")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"token_ids are {array.dtype}, but should be integers")
    top = int(np.iinfo(dtype).max) + 1 if vocab_size is None else vocab_size
    if array.min() < 0 or array.max() >= top:
        raise ValueError(f"token ids span {array.min()}..{array.max()}, but should be in 0..{top - 1}")
    return np.ascontiguousarray(array, dtype=dtype)
