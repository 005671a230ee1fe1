"""How far a correct runtime's logits may move when one prompt is fed another way.

The runtime equivalence group feeds one prompt in one prefill, in chunks (then
one token at a time) and again after ``reset()``, and asks for the same last
logits. A correct engine does not give them bit for bit: llama.cpp's flash
attention on the CPU rounds Q, K and V to float16 and sums in an order that
depends on how many tokens a call holds, so a chunked prompt's last logits move
by up to half a percent of the largest logit on a tiny model (2.27 % was seen on
another, issue 13). A chunking bug (a chunk at the wrong positions, RoPE factors
switched per chunk, a stale slot) moves them by orders of magnitude more.

The criterion is therefore the KL divergence that llama.cpp's own
``llama-perplexity --kl-divergence`` reports, KL(one-shot || other) in nats on
the softmax of the logits (tools/perplexity: sum of p_base * (log p_base -
log p)), with the same top-1 token, and its bound is measured, not guessed:
``FACTOR`` times the largest KL a correct llama.cpp showed in ``NOISE`` for the
KV cache type the runtime declares. A different top-1 counts as the same when
the two tokens are within the measured noise of each other in the one-shot
logits (a tie that rounding may break either way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

__all__ = ["FACTOR", "NOISE", "PRECISION_ORDER", "ConsistencyBound", "Noise", "consistency_bound", "same_top1"]


@dataclass(frozen=True)
class Noise:
    """The largest difference measured between two ways of feeding one prompt to a correct engine."""

    kv_dtype: str
    kl: float  # nats, KL(one-shot || other)
    relative: float  # max|Δlogit| / max|one-shot logit|
    comparisons: int
    how: str


# Measured with tests/consistency_noise.py (llama.cpp through llama-cpp-python 0.3.36, CPU):
# 7 tiny random-weight GGUFs of 3 layers, 6 query heads over 2 KV heads of 32 (gptj RoPE),
# 8192 tokens; chunks of 512 then 16 single tokens against one prefill, and one prefill
# across n_batch/n_ubatch 512/512, 256/128, 2048/512, 8192/2048 with 1 or 2 threads.
# Flash attention off gives bit-equal logits (KL <= 4e-14) for f32 and f16 caches; the
# noise is flash attention's, whose CPU kernel works in f16 whatever the cache type (f32
# and f16 caches gave identical figures). One prefill never moved across batch sizes or
# threads. float16 also holds the figure issue 13 reported from a correct llama.cpp run
# on an unseen GGUF of the same geometry (f16 cache, 8192 tokens), the largest seen.
# The rkllm stand-in (tests/rkllm_standin) gives bit-equal logits by construction: KL 0.
NOISE: Dict[str, Noise] = {
    "float32": Noise("float32", 1.43e-05, 0.0052, 36, "f32 cache, flash attention on; off: KL 3e-14"),
    "float16": Noise("float16", 8.73e-05, 0.0227, 37, "f16 cache, flash attention on: 1.43e-05 (0.52 %) "
                     "here, 8.73e-05 (2.27 %) in issue 13; off: KL 4e-14"),
    "q8_0": Noise("q8_0", 3.24e-14, 0.0, 9, "q8_0 cache, flash attention on"),
    "q4_0": Noise("q4_0", 3.93e-14, 0.0, 9, "q4_0 cache, flash attention on"),
}

# Finest first. A coarser cache is never held to a tighter bound than a finer one (the
# engine's own compute noise does not go away with a coarser cache), and a type not
# measured (bfloat16, fp8_e4m3) takes the envelope of the finer types that were.
PRECISION_ORDER = ("float32", "float16", "bfloat16", "q8_0", "fp8_e4m3", "q4_0")

# Room above the largest noise measured: the KL of one position spreads over an order of
# magnitude between models and batch sizes (median 1e-06, largest 1.43e-05 here; 8.73e-05
# on issue 13's model). A chunking bug gives KL of 4e-02 and more (the broken runtimes of
# tests/runtime_backends.py: 0.039 to 3.4), 45 to 4000 times the float16 bound.
FACTOR = 10.0


@dataclass(frozen=True)
class ConsistencyBound:
    """The KL two feedings of one prompt may differ by, and the noise it comes from."""

    kl: float
    tie: float  # a different top-1 within the measured max|Δlogit| (of the largest logit) is a tie
    kv_dtype: str
    noise: Optional[Noise]  # None: given on the command line

    def describe(self) -> str:
        if self.noise is None:
            return f"<= {self.kl:.3g} nats (--longctx-consistency-kl)"
        envelope = "" if self.noise.kv_dtype == self.kv_dtype else f", the finest measured for {self.kv_dtype}"
        return (f"<= {self.kl:.3g} nats ({FACTOR:g} x the KL {self.noise.kl:.3g} a correct llama.cpp "
                f"showed with a {self.noise.kv_dtype} cache between batch sizes and threads{envelope})")


def _envelope(kv_dtype: str) -> Noise:
    order = PRECISION_ORDER.index(kv_dtype) if kv_dtype in PRECISION_ORDER else len(PRECISION_ORDER) - 1
    measured = [NOISE[d] for d in PRECISION_ORDER[:order + 1] if d in NOISE]
    return max(reversed(measured), key=lambda n: n.kl)  # a tie: the type itself


def consistency_bound(kv_dtype: str, given: Optional[float] = None) -> ConsistencyBound:
    """The bound for a runtime declaring ``kv_dtype``; ``given`` (nats) overrides the measured one."""
    noise = _envelope(kv_dtype)
    if given is not None:
        return ConsistencyBound(float(given), noise.relative, kv_dtype, None)
    return ConsistencyBound(FACTOR * noise.kl, noise.relative, kv_dtype, noise)


def same_top1(candidate: np.ndarray, reference: np.ndarray, tie: float) -> bool:
    """Whether the candidate's top token is the reference's, or within ``tie`` x the largest
    reference logit of the reference's top (rounding may order near-equal logits either way)."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    pick = int(np.argmax(np.asarray(candidate, dtype=np.float64).ravel()))
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return bool(ref[pick] >= np.max(ref) - max(tie, 1e-6) * max(scale, 1.0))
