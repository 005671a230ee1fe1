"""Float64 ground truth for RoPE attention over long KV caches.

The suite judges a backend by comparing its attention output with a truth that
is simple and obviously right: RoPE applied element by element with float64
angles from integer positions, exact softmax attention, and the storage formats
decoded by their public definitions. It runs at 128K positions on a CPU because
scores go through BLAS matmuls per KV-head group, chunked over keys with a
log-sum-exp merge, so memory stays at a few hundred MB. ``plain`` is the
yardstick: the same computation in float32 with K and V stored as the cache
stores them, which is what a correct engine achieves.

Installed as ``pytest_longctx.reference`` (``[tool.setuptools.package-dir]`` in
pyproject.toml maps this top-level folder there). It imports the contract only;
the suite uses it, the plugin does not (its fixture ``longctx_reference`` is the
plugin of ``reference/plugin.py``, an entry point of its own).
"""

from .attention import attend, attention
from .plain import (FREQ_ULPS, HALF_ACTIVATIONS, Plain, farthest, plain_attend, plain_attention, plain_variants,
                    stored_k, stored_k_variants, stored_v)
from .quant import dequantize_q4_0, dequantize_q8_0, quantize_q4_0, quantize_q8_0, roundtrip
from .rope import apply_rope, rope_angles

__all__ = [
    "FREQ_ULPS",
    "HALF_ACTIVATIONS",
    "Plain",
    "plain_attention",
    "plain_variants",
    "apply_rope",
    "attend",
    "attention",
    "dequantize_q4_0",
    "dequantize_q8_0",
    "farthest",
    "plain_attend",
    "quantize_q4_0",
    "quantize_q8_0",
    "rope_angles",
    "roundtrip",
    "stored_k",
    "stored_k_variants",
    "stored_v",
]
