"""A complete third-party backend in about 60 lines: a float32 KV cache on NumPy.

Run the suite on it:  pytest --longctx-backend=examples.minimal_backend:MinimalBackend
"""

import numpy as np

from pytest_longctx import BackendInfo, ContextLimitExceeded, NotSupported, rope_frequencies


class MinimalCache:
    def __init__(self, spec):
        if spec.kv_dtype != "float32":
            raise NotSupported(f"only float32, not {spec.kv_dtype}")
        self.spec, self.rope = spec, rope_frequencies(spec)
        shape = (spec.n_layers, spec.max_positions, spec.n_kv_heads, spec.head_dim)
        self.k, self.v = np.empty(shape, np.float32), np.empty(shape, np.float32)
        self.lengths = [0] * spec.n_layers

    def rotate(self, x, start):
        f, half = self.rope, self.rope.rotary_dim // 2
        angles = np.arange(start, start + len(x))[:, None, None] * f.inv_freq  # float64
        cos, sin = np.cos(angles) * f.attention_factor, np.sin(angles) * f.attention_factor
        out = x.astype(np.float32)
        if self.spec.rope.style == "neox":
            a, b = x[..., :half], x[..., half:2 * half]
            out[..., :half], out[..., half:2 * half] = a * cos - b * sin, a * sin + b * cos
        else:
            a, b = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
            out[..., 0:2 * half:2], out[..., 1:2 * half:2] = a * cos - b * sin, a * sin + b * cos
        return out

    def length(self, layer):
        return self.lengths[layer]

    def append(self, layer, k, v):
        n, start = len(k), self.lengths[layer]
        if start + n > self.spec.max_positions:
            raise ContextLimitExceeded(layer, start, n, self.spec.max_positions)
        self.k[layer, start:start + n], self.v[layer, start:start + n] = self.rotate(k, start), v
        self.lengths[layer] = start + n

    def attend(self, layer, q):
        s, length, n_q = self.spec, self.lengths[layer], len(q)
        q = self.rotate(q, length - n_q).reshape(n_q, s.n_kv_heads, s.group_size, s.head_dim)
        scores = np.einsum("qgnd,kgd->gnqk", q, self.k[layer, :length]) * s.scale
        if s.softcap:
            scores = s.softcap * np.tanh(scores / s.softcap)
        pos, keys = np.arange(length - n_q, length)[:, None], np.arange(length)[None, :]
        visible = (keys <= pos) & ((keys > pos - s.sliding_window) if s.sliding_window else True)
        scores = np.where(visible, scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        out = np.einsum("gnqk,kgd->qgnd", weights / weights.sum(-1, keepdims=True), self.v[layer, :length])
        return out.reshape(n_q, s.n_heads, s.head_dim)

    def read(self, layer, start, stop):
        return self.k[layer, start:stop], self.v[layer, start:stop]

    def nbytes(self):
        return self.k.nbytes + self.v.nbytes

    def close(self):
        self.k = self.v = None


class MinimalBackend:
    name = "minimal"

    def info(self):
        return BackendInfo(name=self.name, device_kind="cpu", kv_dtypes=("float32",))

    def open_cache(self, spec):
        return MinimalCache(spec)

    asarray = to_numpy = staticmethod(np.asarray)

    def synchronize(self):
        pass

    def memory_in_use(self):
        return None
