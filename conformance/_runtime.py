"""Helpers of the whole-model runtime groups: guarded runtime calls, the prompt, logits.

A runtime is seen only through token ids in and logits, token ids and
statistics out. Every call is guarded like the KV-cache groups' calls: an
exception, a wrong shape or a NaN is a one-line failure naming the call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pytest

from pytest_longctx import ModelRuntime
from pytest_longctx.measure.consistency import ConsistencyBound, consistency_bound, same_top1
from pytest_longctx.measure.golden import GoldenLogits, load
from pytest_longctx.measure.metrics import LogitsComparison, compare_logits
from pytest_longctx.measure.prefill import prefill_chunks as chunked
from pytest_longctx.measure.prefill import token_ids
from pytest_longctx.session.settings import Settings

from ._check import call, fail


def where(backend: Any, runtime: ModelRuntime, settings: Settings) -> str:
    spec = runtime.kv_spec
    model = os.path.basename(settings.model or "")
    return (f"{backend.name} {model} context {runtime.context_limit}, "
            f"{spec.describe()} kv {spec.kv_dtype}")


def tags(runtime: ModelRuntime, settings: Settings) -> dict:
    """What a runtime figure carries besides the check: the KV dtype in force, the model and
    its geometry (the figures table names it instead of the run's --longctx-shape)."""
    return {"kv_dtype": runtime.kv_spec.kv_dtype, "model": os.path.basename(settings.model or ""),
            "geometry": runtime.kv_spec.describe()}


def logits_of(value: Any, runtime: ModelRuntime, what: str, at: str) -> Optional[np.ndarray]:
    """A prefill's result as float64 on the host, its shape and values checked; None stays None."""
    __tracebackhide__ = True
    if value is None:
        return None
    array = np.asarray(value)
    if array.shape != (runtime.vocab_size,):
        fail(f"{what} shape", array.shape, f"({runtime.vocab_size},) (vocab_size)", at)
    if not np.issubdtype(array.dtype, np.floating):
        fail(f"{what} dtype", array.dtype, "a floating type", at)
    bad = ~np.isfinite(array)
    if bad.any():
        fail(f"{what}", f"{int(bad.sum())} NaN/Inf values (first at token {int(np.argmax(bad))})",
             "finite", at)
    return array.astype(np.float64)


def prefill(runtime: ModelRuntime, ids: Sequence[int], at: str, what: str = "") -> Optional[np.ndarray]:
    __tracebackhide__ = True
    label = what or f"prefill of {len(ids)} tokens at position {runtime.positions()}"
    return logits_of(call(label, runtime.prefill, ids), runtime, f"logits of {label}", at)


def prefill_chunks(runtime: ModelRuntime, ids: Sequence[int], chunk: int, at: str) -> Optional[np.ndarray]:
    """Prefill in chunks, each call guarded; the last chunk's logits."""
    __tracebackhide__ = True
    return chunked(lambda part: prefill(runtime, part, at), ids, chunk)


def positions(runtime: ModelRuntime) -> int:
    __tracebackhide__ = True
    return int(call("positions()", runtime.positions))


def reset(runtime: ModelRuntime, at: str) -> None:
    """Empty the context; a runtime that still holds positions afterwards fails here."""
    __tracebackhide__ = True
    call("reset()", runtime.reset)
    held = positions(runtime)
    if held != 0:
        fail("positions() after reset()", held, 0, at)


def need_logits(logits: Optional[np.ndarray]) -> np.ndarray:
    __tracebackhide__ = True
    if logits is None:
        pytest.skip("the runtime returns no logits: logits cannot be compared")
    return logits


def need_depth(runtime: ModelRuntime, depth: int, extra: int = 0) -> None:
    __tracebackhide__ = True
    if depth + extra > runtime.context_limit:
        pytest.skip(f"depth {depth} is beyond the runtime's context of {runtime.context_limit}: not claimed")


def golden(settings: Settings) -> Optional[GoldenLogits]:
    """The reference logits of --longctx-reference-logits (None without it); a bad file fails."""
    __tracebackhide__ = True
    if settings.reference_logits is None:
        return None
    return call(f"reading --longctx-reference-logits={settings.reference_logits}", load,
                settings.reference_logits)


def prompt(settings: Settings, runtime: ModelRuntime, n: int, reference: Optional[GoldenLogits] = None) -> np.ndarray:
    """n token ids: the reference file's when it has that many, else drawn with the run's seed."""
    if reference is not None and reference.tokens.size >= n:
        return reference.tokens[:n]
    return token_ids(settings.seed, runtime.vocab_size, n)


def bound(runtime: ModelRuntime, settings: Settings) -> ConsistencyBound:
    """The KL bound of the consistency checks, keyed on the KV dtype the runtime declares."""
    return consistency_bound(runtime.kv_spec.kv_dtype, settings.consistency_kl)


@dataclass(frozen=True)
class Consistency:
    comparison: LogitsComparison
    top1: bool  # the same top-1, or a tie within the measured noise
    bound: ConsistencyBound

    @property
    def passed(self) -> bool:
        return self.comparison.kl <= self.bound.kl and self.top1

    def record(self) -> dict:
        """What the figures table and the certificate carry."""
        c = self.comparison
        return dict(bound=f"KL {self.bound.describe()}, same top-1", passed=self.passed,
                    cell=f"KL {c.kl:.2g} ({c.relative:.2%} of max logit)", threshold=self.bound.kl,
                    noise_kl=self.bound.noise.kl if self.bound.noise else None,
                    **dict(c.as_dict(), top1=self.top1))


def consistency(candidate: np.ndarray, reference: np.ndarray, runtime: ModelRuntime,
                settings: Settings) -> Consistency:
    limit = bound(runtime, settings)
    return Consistency(compare_logits(candidate, reference), same_top1(candidate, reference, limit.tie), limit)


def check_consistent(what: str, result: Consistency, at: str) -> None:
    """Logits that should be the same computation: KL within the measured bound, same top-1."""
    __tracebackhide__ = True
    if not result.passed:
        c = result.comparison
        fail(what, f"KL {c.kl:.3g} nats (max|Δlogit| {c.max_abs:.3g}, {c.relative:.2%} of the largest logit, "
             f"top-1 {'same' if result.top1 else 'different'})",
             f"KL {result.bound.describe()} with the same top-1", at)
