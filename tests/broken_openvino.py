"""Deliberately broken variants of the openvino backend: each a mistake that is easy to make
with OpenVINO and that the suite must catch. Named on the command line as
``broken_openvino:TopLeftCausal`` with this directory on ``sys.path``.
"""

from __future__ import annotations

from typing import Any, Dict

from pytest_longctx.backends import _openvino_graphs as G
from pytest_longctx.backends.openvino_backend import OpenVinoBackend


def _top_left_attention(op: Any, q: Any, k: Any, v: Any, allowed: Any, config: G.GraphConfig) -> Any:
    """SDPA's own causal=True in place of the explicit mask: its triangle is aligned top-left,
    so query i of a chunk at the end of L keys sees keys 0..i instead of 0..L-n_q+i."""
    kv, g, d = config.n_kv_heads, config.group, config.head_dim
    q5 = op.unsqueeze(op.transpose(op.reshape(q, G._i64(op, [0, kv, g, d]), True), [1, 2, 0, 3]), 0)
    out = op.scaled_dot_product_attention(q5, op.unsqueeze(k, 2), op.unsqueeze(v, 2),
                                          op.constant(G.np.float32(0.0)),
                                          op.constant(G.np.float32(config.scale)), causal=True)
    out = op.transpose(op.squeeze(out, G._i64(op, [0])), [2, 0, 1, 3])
    return op.reshape(out, G._i64(op, [0, config.n_heads, d]), True)


class TopLeftCausal(OpenVinoBackend):
    """Attention with causal=True: right for a whole prompt, wrong for any chunk at the end of a cache."""

    def _models(self, spec: Any, size: Any = None) -> Any:
        real = G.attention
        G.attention = _top_left_attention
        try:
            return super()._models(spec, size)
        finally:
            G.attention = real


class ImplicitPrecision(OpenVinoBackend):
    """The precision hint left to the plugin: bf16 on a CPU with bf16 instructions."""

    def _config(self, kv_dtype: str, threads: Any = None) -> Dict[str, Any]:
        config = super()._config(kv_dtype, threads)
        config.pop("INFERENCE_PRECISION_HINT", None)
        return config
