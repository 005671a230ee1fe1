"""What a KV cache must hold: the RoPE variant and the cache geometry.

Both specs are frozen and validated on construction, so a malformed shape is
refused with the field it got wrong before anything is allocated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from .errors import SpecError

ROPE_KINDS = ("none", "default", "linear", "dynamic", "yarn", "longrope", "llama3")
ROPE_STYLES = ("neox", "gptj")  # the pairings: i with i + rotary_dim/2 (neox), or 2i with 2i+1 (gptj)
# The optional attention settings of a CacheSpec, by the name the suite and the coverage table
# give them: sliding_window, softcap, softmax_scale.
ATTENTION_FEATURES = ("window", "softcap", "scale")
KV_DTYPES = ("float32", "float16", "bfloat16", "q8_0", "q4_0", "fp8_e4m3")

# Bytes per block of values along head_dim: (values per block, bytes per block).
_DTYPE_BLOCKS = {
    "float32": (1, 4),
    "float16": (1, 2),
    "bfloat16": (1, 2),
    "fp8_e4m3": (1, 1),
    "q8_0": (32, 34),  # fp16 scale + 32 int8
    "q4_0": (32, 18),  # fp16 scale + 16 bytes of nibbles
}

# Which parameters each RoPE kind needs (beyond theta).
_ROPE_REQUIRED = {
    "none": (),
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_positions"),
    "yarn": ("factor", "original_max_positions"),
    "longrope": ("original_max_positions", "short_factor", "long_factor"),
    "llama3": ("factor", "original_max_positions", "low_freq_factor", "high_freq_factor"),
}


@dataclass(frozen=True)
class RopeSpec:
    """A rotary position embedding and its scaling variant.

    Formulas follow Hugging Face transformers' rope utilities; see
    ``pytest_longctx.rope.rope_frequencies`` for the normative computation.
    """

    kind: str = "default"
    theta: float = 10000.0
    style: str = "neox"
    rotary_dim: Optional[int] = None
    factor: Optional[float] = None
    original_max_positions: Optional[int] = None
    beta_fast: Optional[float] = None
    beta_slow: Optional[float] = None
    attention_factor: Optional[float] = None
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    short_factor: Optional[Tuple[float, ...]] = None
    long_factor: Optional[Tuple[float, ...]] = None
    low_freq_factor: Optional[float] = None
    high_freq_factor: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(float(x) for x in value))
        if self.kind not in ROPE_KINDS:
            raise SpecError(f"rope kind={self.kind!r}, but should be one of {', '.join(ROPE_KINDS)}")
        if self.style not in ROPE_STYLES:
            raise SpecError(f"rope style={self.style!r}, but should be one of {', '.join(ROPE_STYLES)}")
        if not self.theta > 0:
            raise SpecError(f"rope theta={self.theta!r}, but should be > 0")
        if self.rotary_dim is not None and (self.rotary_dim <= 0 or self.rotary_dim % 2):
            raise SpecError(f"rope rotary_dim={self.rotary_dim!r}, but should be a positive even number")
        missing = [name for name in _ROPE_REQUIRED[self.kind] if getattr(self, name) is None]
        if missing:
            raise SpecError(f"rope kind={self.kind!r} needs {', '.join(missing)}")
        if self.factor is not None and not self.factor > 0:
            raise SpecError(f"rope factor={self.factor!r}, but should be > 0")
        if self.original_max_positions is not None and self.original_max_positions <= 0:
            raise SpecError(
                f"rope original_max_positions={self.original_max_positions!r}, but should be > 0"
            )
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise SpecError("rope llama3 high_freq_factor must be greater than low_freq_factor")


@dataclass(frozen=True)
class CacheSpec:
    """The geometry of a KV cache, its storage type and its attention options."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_positions: int
    kv_dtype: str = "float16"
    rope: RopeSpec = RopeSpec()
    sliding_window: Optional[int] = None
    softmax_scale: Optional[float] = None
    softcap: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("n_layers", "n_heads", "n_kv_heads", "head_dim", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SpecError(f"{name}={value!r}, but should be a positive integer")
        if self.n_heads % self.n_kv_heads:
            raise SpecError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise SpecError(f"head_dim={self.head_dim}, but should be even")
        if self.kv_dtype not in KV_DTYPES:
            raise SpecError(f"kv_dtype={self.kv_dtype!r}, but should be one of {', '.join(KV_DTYPES)}")
        block = _DTYPE_BLOCKS[self.kv_dtype][0]
        if self.head_dim % block:
            raise SpecError(f"kv_dtype={self.kv_dtype} needs head_dim divisible by {block}")
        if self.rope.rotary_dim is not None and self.rope.rotary_dim > self.head_dim:
            raise SpecError(
                f"rope rotary_dim={self.rope.rotary_dim} is larger than head_dim={self.head_dim}"
            )
        if self.sliding_window is not None and (
            not isinstance(self.sliding_window, int)
            or isinstance(self.sliding_window, bool)
            or self.sliding_window <= 0
        ):
            raise SpecError(f"sliding_window={self.sliding_window!r}, but should be a positive integer")
        if self.rope.kind == "dynamic" and self.rotary_dim <= 2:
            raise SpecError(f"rope kind='dynamic' needs rotary_dim > 2, got {self.rotary_dim}")
        for name in ("short_factor", "long_factor"):
            values = getattr(self.rope, name)
            if values is not None and len(values) != self.rotary_dim // 2:
                raise SpecError(
                    f"rope {name} has {len(values)} values, but should have rotary_dim/2 = {self.rotary_dim // 2}"
                )
        if self.softmax_scale is not None and not self.softmax_scale > 0:
            raise SpecError(f"softmax_scale={self.softmax_scale!r}, but should be > 0")
        if self.softcap is not None and not self.softcap > 0:
            raise SpecError(f"softcap={self.softcap!r}, but should be > 0")

    @property
    def group_size(self) -> int:
        """Query heads per KV head: query head h reads KV head h // group_size."""
        return self.n_heads // self.n_kv_heads

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that rotate (0 for kind "none"); the rest pass through."""
        if self.rope.kind == "none":
            return 0
        return self.rope.rotary_dim if self.rope.rotary_dim is not None else self.head_dim

    @property
    def scale(self) -> float:
        return self.softmax_scale if self.softmax_scale is not None else self.head_dim ** -0.5

    def position_bytes(self) -> int:
        """Bytes of K and V for one position across all layers."""
        values, nbytes = _DTYPE_BLOCKS[self.kv_dtype]
        return 2 * self.n_layers * self.n_kv_heads * (self.head_dim // values) * nbytes

    def kv_bytes(self, positions: int) -> int:
        """The exact analytic KV size for that many positions, block overhead included."""
        if positions < 0:
            raise SpecError(f"positions={positions}, but should be >= 0")
        return positions * self.position_bytes()

    def replace(self, **changes: Any) -> "CacheSpec":
        """A copy with fields changed; RopeSpec fields are accepted too."""
        rope_fields = {f.name for f in dataclasses.fields(RopeSpec)}
        rope_changes = {k: changes.pop(k) for k in list(changes) if k in rope_fields}
        spec = dataclasses.replace(self, **changes) if changes else self
        if rope_changes:
            spec = dataclasses.replace(spec, rope=dataclasses.replace(spec.rope, **rope_changes))
        return spec

    def describe(self) -> str:
        """One line naming the geometry, for headers and failure messages."""
        parts = [
            f"{self.n_layers}L",
            f"{self.n_heads}h/{self.n_kv_heads}kv",
            f"d{self.head_dim}",
            f"rope={self.rope.kind}/{self.rope.style}",
        ]
        if self.sliding_window:
            parts.append(f"window={self.sliding_window}")
        if self.softcap:
            parts.append(f"softcap={self.softcap:g}")
        return " ".join(parts)
