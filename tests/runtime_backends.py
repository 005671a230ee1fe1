"""Whole-model runtimes for the runtime groups' own tests: a correct toy and its defects.

``ToyRuntimeBackend`` loads a "model" described by a small text file
(``toy-runtime ctx=4096 seed=1``): one attention layer over token embeddings
with RoPE at the absolute positions, logits from its output. Its KV cache is
real NumPy memory that grows by ``kv_spec.kv_bytes`` per position (K and V of
every layer and head are computed and kept; the logits read layer 0, head 0),
so the memory group measures something true. Every broken runtime overrides
one step; its docstring names the bug class (docs/runtimes.md lists them).

Name them as ``runtime_backends:ToyRuntimeBackend`` with this directory on sys.path.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from typing import List, Optional, Sequence

import numpy as np

from pytest_longctx import (
    BackendInfo, CacheSpec, ContextClamped, ContextLimitExceeded, RuntimeStats, SpecError,
)

VOCAB, WIDTH = 64, 32
LAYERS, KV_HEADS, HEAD_DIM = 8, 8, 64  # 32 KiB of float32 K and V per position


def write_model(path: str, context: int = 4096, seed: int = 1) -> str:
    with open(path, "w") as f:
        f.write(f"toy-runtime ctx={context} seed={seed}\n")
    return path


class ToyRuntime:
    """One loaded toy model with a context that prefill extends."""

    def __init__(self, model: str, context: Optional[int]) -> None:
        if not os.path.isfile(model):
            raise SpecError(f"model {model}: no such file")
        with open(model) as f:
            match = re.fullmatch(r"toy-runtime ctx=(\d+) seed=(\d+)\s*", f.read(200))
        if not match:
            raise SpecError(f"model {model}: not a toy-runtime model file")
        self.model_context_limit = int(match.group(1))
        self.context_limit = self.grant(context)
        rng = np.random.default_rng(int(match.group(2)))
        self.embed = rng.standard_normal((VOCAB, WIDTH))
        self.w_kv = (rng.standard_normal((2, WIDTH, LAYERS * KV_HEADS * HEAD_DIM)) / np.sqrt(WIDTH)).astype(np.float32)
        self.w_q = rng.standard_normal((WIDTH, HEAD_DIM)) / np.sqrt(WIDTH)
        self.w_out = rng.standard_normal((HEAD_DIM, VOCAB)) * 2.0
        self.inv_freq = 10000.0 ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
        self.kv_spec = CacheSpec(LAYERS, KV_HEADS, KV_HEADS, HEAD_DIM, self.context_limit, "float32")
        self.vocab_size = VOCAB
        self.reset()
        self.seconds = {"prefill": 0.0, "generate": 0.0}
        self.tokens = {"prefill": 0, "generate": 0}

    # The steps broken runtimes override.

    def grant(self, context: Optional[int]) -> int:
        if context is None:
            return self.model_context_limit
        if context > self.model_context_limit:
            warnings.warn(ContextClamped(context, self.model_context_limit))
            return self.model_context_limit
        return context

    def accept(self, n: int) -> int:
        """How many of n new tokens to store; refuse the whole prompt past the limit."""
        if self.length + n > self.context_limit:
            raise ContextLimitExceeded(None, self.length, n, self.context_limit)
        return n

    def rope_positions(self, n: int) -> np.ndarray:
        return np.arange(self.length, self.length + n)

    def rope_factors(self, n: int) -> np.ndarray:
        """What each RoPE frequency is divided by for a prompt of n tokens (none: ones)."""
        return np.ones(HEAD_DIM // 2)

    def store(self, k: np.ndarray, v: np.ndarray) -> None:
        self.k_chunks.append(k)
        self.v_chunks.append(v)

    def keys(self) -> np.ndarray:
        return np.concatenate([k[:, 0, 0] for k in self.k_chunks])

    def values(self) -> np.ndarray:
        return np.concatenate([v[:, 0, 0] for v in self.v_chunks])

    def finish(self, logits: np.ndarray) -> np.ndarray:
        return logits

    def pick(self, logits: np.ndarray) -> int:
        return int(np.argmax(logits))

    # The contract.

    def _rotate(self, x: np.ndarray, positions: np.ndarray, factors: np.ndarray) -> np.ndarray:
        angles = positions[:, None] * (self.inv_freq / factors)
        cos, sin = np.cos(angles), np.sin(angles)
        half = HEAD_DIM // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        began = time.perf_counter()
        ids = np.asarray(token_ids, dtype=np.int64)
        n = self.accept(len(ids))
        ids = ids[:n]
        x = self.embed[ids]
        x32 = x.astype(np.float32)
        k = (x32 @ self.w_kv[0]).reshape(n, LAYERS, KV_HEADS, HEAD_DIM)
        v = (x32 @ self.w_kv[1]).reshape(n, LAYERS, KV_HEADS, HEAD_DIM)
        factors = self.rope_factors(n)
        k[:, 0, 0] = self._rotate(k[:, 0, 0], self.rope_positions(n), factors)
        self.store(k, v)
        self.length += n
        q = self._rotate((x[-1] @ self.w_q)[None], np.array([self.length - 1]), factors)[0]
        keys, values = self.keys(), self.values()
        scores = keys @ q / np.sqrt(HEAD_DIM)
        weights = np.exp(scores - scores.max())
        out = (weights / weights.sum()) @ values
        self.last = self.finish((out @ self.w_out).astype(np.float32))
        self.seconds["prefill"] += time.perf_counter() - began
        self.tokens["prefill"] += n
        return self.last.copy()

    def generate(self, n: int) -> List[int]:
        began, out = time.perf_counter(), []
        for _ in range(n):
            token = self.pick(self.last)
            out.append(token)
            self.prefill([token])
        self.seconds["prefill"] -= time.perf_counter() - began
        self.tokens["prefill"] -= n
        self.seconds["generate"] += time.perf_counter() - began
        self.tokens["generate"] += n
        return out

    def positions(self) -> int:
        return self.length

    def reset(self) -> None:
        self.k_chunks: List[np.ndarray] = []
        self.v_chunks: List[np.ndarray] = []
        self.length = 0
        self.last = np.zeros(VOCAB, np.float32)

    def stats(self) -> RuntimeStats:
        return RuntimeStats(self.seconds["prefill"], self.tokens["prefill"],
                            self.seconds["generate"], self.tokens["generate"])

    def close(self) -> None:
        self.reset()


class ToyRuntimeBackend:
    name = "toy-runtime"
    runtime_class = ToyRuntime

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, "cpu", "toy", kv_dtypes=("float32",))

    def open_runtime(self, model: str, context: Optional[int] = None, **options: object) -> ToyRuntime:
        return self.runtime_class(model, context)


def _backend(runtime_class: type) -> type:
    return type(runtime_class.__name__ + "Backend", (ToyRuntimeBackend,), {"runtime_class": runtime_class})


# ----------------------------------------------------------------------------- broken


class HalfApplies(ToyRuntime):
    """Capacity contract (bug class 5): stores what fits of a crossing prompt, then raises
    (llama.cpp's "failed to find a memory slot" after earlier batches were applied)."""

    def accept(self, n: int) -> int:
        if self.length + n > self.context_limit:
            fits = self.context_limit - self.length
            if fits == 0:
                raise ContextLimitExceeded(None, self.length, n, self.context_limit)
            self._raise_after = True
            return fits
        return n

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        self._raise_after = False
        logits = super().prefill(token_ids)
        if self._raise_after:
            raise ContextLimitExceeded(None, self.length, len(token_ids), self.context_limit, "memory slot")
        return logits


class SilentlyTakesMoreContext(ToyRuntime):
    """A context asked above the model's training context is granted without a word."""

    def grant(self, context: Optional[int]) -> int:
        return context if context is not None else self.model_context_limit


class ChunkPositionsRestart(ToyRuntime):
    """Chunked prefill differs from one-shot (bug class 7): every prompt's RoPE starts at 0."""

    def rope_positions(self, n: int) -> np.ndarray:
        return np.arange(n)


class LongRopeFactorsPerChunk(ToyRuntime):
    """Chunked prefill differs from one-shot (bug class 7, vLLM #27414): LongRoPE's short or
    long factors are picked per prefill call from where that call ends, not once for the
    context, so keys cached by early chunks carry the short factors while later queries
    rotate with the long ones ("attention just collapses", llama.cpp #24823)."""

    ORIGINAL = 2048  # the training context the short factors serve
    LONG = np.linspace(1.0, 16.0, HEAD_DIM // 2)  # stretch the low frequencies most, as LongRoPE does

    def rope_factors(self, n: int) -> np.ndarray:
        return self.LONG if self.length + n > self.ORIGINAL else np.ones(HEAD_DIM // 2)


class ResetKeepsStaleKeys(ToyRuntime):
    """Stale slots leak into output (bug class 8): reset() empties the count, not the keys."""

    def reset(self) -> None:
        stale = getattr(self, "k_chunks", [])[:1], getattr(self, "v_chunks", [])[:1]
        super().reset()
        self.stale = stale

    def keys(self) -> np.ndarray:
        return np.concatenate([k[:, 0, 0] for k in self.stale[0] + self.k_chunks])

    def values(self) -> np.ndarray:
        return np.concatenate([v[:, 0, 0] for v in self.stale[1] + self.v_chunks])


class KeepsTwoCopies(ToyRuntime):
    """KV memory above the analytic size: every chunk is kept twice."""

    def store(self, k: np.ndarray, v: np.ndarray) -> None:
        super().store(k, v)
        self.shadow += [k.copy(), v.copy()]

    def reset(self) -> None:
        super().reset()
        self.shadow = []


class NotGreedy(ToyRuntime):
    """A fast wrong answer: generate() does not follow the logits."""

    def pick(self, logits: np.ndarray) -> int:
        return int(np.argmin(logits))


class NanAfter2048(ToyRuntime):
    """fp16 overflow at long context (bug class 3): logits turn NaN past 2048 positions."""

    def finish(self, logits: np.ndarray) -> np.ndarray:
        return logits * np.nan if self.length > 2048 else logits


class NoisyLogits(ToyRuntime):
    """Accuracy lost (a bad quantization): logits far from the float reference."""

    def finish(self, logits: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(self.length)
        return logits + rng.standard_normal(logits.shape).astype(np.float32) * 4.0


class WrapsAround(ToyRuntime):
    """A ring buffer (bug class 6): past the limit it drops the oldest positions, no error."""

    def accept(self, n: int) -> int:
        over = self.length + n - self.context_limit
        if over > 0:
            drop = over
            while drop > 0 and self.k_chunks:
                chunk = self.k_chunks[0].shape[0]
                if chunk > drop:
                    self.k_chunks[0], self.v_chunks[0] = self.k_chunks[0][drop:], self.v_chunks[0][drop:]
                    self.length -= drop
                    break
                self.k_chunks.pop(0)
                self.v_chunks.pop(0)
                self.length -= chunk
                drop -= chunk
        return n


class ExitsPastTheLimit(ToyRuntime):
    """A vendor binding that calls exit() where it should raise (an RKLLM wrapper on a
    negative return code): SystemExit is not an Exception, and must still fail one case."""

    def accept(self, n: int) -> int:
        if self.length + n > self.context_limit:
            raise SystemExit("rkllm_run failed: -1")
        return n


class CloseRaises(ToyRuntime):
    """A close() that raises: not a verdict on any case, but never silent."""

    def close(self) -> None:
        super().close()
        raise RuntimeError("rkllm_destroy failed: -2")


class ExitsOnOpenBackend(ToyRuntimeBackend):
    """exit() from the vendor's loader instead of an exception."""

    name = "exits-on-open"

    def open_runtime(self, model: str, context: Optional[int] = None, **options: object) -> ToyRuntime:
        raise SystemExit("rkllm_init failed: -1")


HalfAppliesBackend = _backend(HalfApplies)
SilentlyTakesMoreContextBackend = _backend(SilentlyTakesMoreContext)
ChunkPositionsRestartBackend = _backend(ChunkPositionsRestart)
LongRopeFactorsPerChunkBackend = _backend(LongRopeFactorsPerChunk)
ResetKeepsStaleKeysBackend = _backend(ResetKeepsStaleKeys)
KeepsTwoCopiesBackend = _backend(KeepsTwoCopies)
NotGreedyBackend = _backend(NotGreedy)
NanAfter2048Backend = _backend(NanAfter2048)
NoisyLogitsBackend = _backend(NoisyLogits)
WrapsAroundBackend = _backend(WrapsAround)
ExitsPastTheLimitBackend = _backend(ExitsPastTheLimit)
CloseRaisesBackend = _backend(CloseRaises)


class SegfaultsOnLoadBackend(ToyRuntimeBackend):
    """Every model load dereferences NULL, as a runtime built for another ABI does (rknn-llm
    #509: a 1.2 binding against the 1.3 library): the process dies in setup, before any
    case could report what it was."""

    name = "segfaults-on-load"

    def open_runtime(self, model: str, context: Optional[int] = None, **options: object) -> ToyRuntime:
        import ctypes

        ctypes.string_at(0)  # SIGSEGV
        raise AssertionError("unreachable")
