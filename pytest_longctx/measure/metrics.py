"""Comparison metrics for output equivalence, in pure NumPy.

A backend's output is judged against a float64 reference the way
FlashAttention's tests judge theirs: its error may be at most a factor times
the error of a plain implementation computed in the same precision, plus a
floor. The bound thus follows the precision actually in play, not a fixed
tolerance. Arrays must already be on the host (``backend.to_numpy``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

__all__ = ["Comparison", "LogitsComparison", "Verdict", "compare", "compare_logits", "is_top1", "judge"]


@dataclass(frozen=True)
class Comparison:
    """How far a candidate array is from a reference array.

    Any NaN/Inf in the candidate makes ``max_abs`` and ``nmse`` infinite, so
    a caller that only checks ``max_abs`` still fails it.
    """

    max_abs: float
    nmse: float
    nonfinite: int
    where: Optional[Tuple[int, ...]]
    shape_ok: bool = True
    message: str = ""

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _as_float64(array: Any) -> np.ndarray:
    return np.asarray(array).astype(np.float64, copy=False)


def compare(candidate: Any, reference: Any) -> Comparison:
    """Max absolute error, NMSE and NaN/Inf count of ``candidate`` against ``reference``.

    NMSE is mse(candidate, reference) / mse(reference, 0): scale-free, so one
    figure reads the same at every magnitude (0 when both are all zeros).
    A shape mismatch is reported in the result, not raised.
    """
    cand, ref = _as_float64(candidate), _as_float64(reference)
    nonfinite = int(np.count_nonzero(~np.isfinite(cand)))
    if cand.shape != ref.shape:
        return Comparison(
            max_abs=math.inf,
            nmse=math.inf,
            nonfinite=nonfinite,
            where=None,
            shape_ok=False,
            message=f"shape {cand.shape}, but should be {ref.shape}",
        )
    if cand.size == 0:
        return Comparison(max_abs=0.0, nmse=0.0, nonfinite=0, where=None)
    with np.errstate(invalid="ignore", over="ignore"):
        error = np.abs(cand - ref)
    error[~np.isfinite(error)] = math.inf  # NaN would hide from max(); inf does not
    error[cand == ref] = 0.0  # equal infinities are no error
    flat = int(np.argmax(error))
    max_abs = float(error.flat[flat])
    where = tuple(int(i) for i in np.unravel_index(flat, error.shape)) if max_abs > 0 else None
    return Comparison(max_abs=max_abs, nmse=_nmse(error, ref), nonfinite=nonfinite, where=where)


def _nmse(error: np.ndarray, ref: np.ndarray) -> float:
    with np.errstate(over="ignore"):
        mse = float(np.mean(np.square(error)))
        power = float(np.mean(np.square(ref)))
    if power == 0.0:
        return 0.0 if mse == 0.0 else math.inf
    return mse / power


@dataclass(frozen=True)
class Verdict:
    """Whether a candidate passed the factor x plain + floor criterion, and by what margin."""

    passed: bool
    error: float
    allowed: float
    plain_error: float
    factor: float
    floor: float
    nmse: float
    nonfinite: int
    where: Optional[Tuple[int, ...]] = None
    detail: str = ""

    def message(self, what: str, case: str) -> str:
        """One line: measured, expected, case; readable without the test's source."""
        if self.detail:
            return f"{what}: {self.detail} [{case}]"
        if self.nonfinite:
            noun = "value" if self.nonfinite == 1 else "values"
            first = f", the first at index {self.where}" if self.where is not None else ""
            return f"{what}: has {self.nonfinite} NaN/Inf {noun}{first}, but should have none [{case}]"
        verb = "within" if self.passed else "but should be <="
        return (
            f"{what}: max|error|={self.error:.1e} (NMSE {self.nmse:.1e}), {verb} "
            f"{self.factor:g} x plain {self.plain_error:.1e} + {self.floor:.1e} "
            f"= {self.allowed:.1e} [{case}]"
        )

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def judge(candidate: Any, reference: Any, plain: Any, *, factor: float, floor: float) -> Verdict:
    """The FlashAttention criterion: err(candidate) <= factor x err(plain) + floor.

    Errors are max absolute errors against the float64 ``reference``; ``plain``
    is the straightforward implementation in the candidate's precision (None
    for an absolute bound of ``floor``). Any NaN/Inf in the candidate fails,
    and so does a shape mismatch. A broken ``plain`` is a defect of the suite,
    not of the backend, and raises ValueError.
    """
    if not (factor >= 0 and floor >= 0):
        raise ValueError(f"factor and floor must be >= 0, got factor={factor}, floor={floor}")
    plain_error = _plain_error(plain, reference)
    allowed = factor * plain_error + floor
    got = compare(candidate, reference)
    passed = got.shape_ok and got.nonfinite == 0 and got.max_abs <= allowed
    return Verdict(
        passed=passed,
        error=got.max_abs,
        allowed=allowed,
        plain_error=plain_error,
        factor=float(factor),
        floor=float(floor),
        nmse=got.nmse,
        nonfinite=got.nonfinite,
        where=got.where,
        detail=got.message,
    )


def _plain_error(plain: Any, reference: Any) -> float:
    if plain is None:
        return 0.0
    got = compare(plain, reference)
    if not got.shape_ok or got.nonfinite:
        problem = got.message or f"{got.nonfinite} NaN/Inf values"
        raise ValueError(f"internal: the plain implementation is unusable as a baseline: {problem}")
    return got.max_abs


# ----------------------------------------------------------------------------- logits


@dataclass(frozen=True)
class LogitsComparison:
    """One position's next-token logits against the reference's.

    ``kl`` is KL(reference || candidate) in nats over the softmax of each;
    ``top1`` says whether the candidate's most likely token is one the
    reference ranks first (a tie in the reference counts as agreement).
    """

    kl: float
    top1: bool
    max_abs: float
    relative: float  # max_abs / max |reference|

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - np.max(x)
    return shifted - np.log(np.sum(np.exp(shifted)))


def is_top1(logits: Any, token: int) -> bool:
    """Whether ``token`` is a most likely token of ``logits`` (a tie within 1e-6 of the scale counts)."""
    values = _as_float64(logits).ravel()
    scale = float(np.max(np.abs(values))) if values.size else 0.0
    return bool(values[int(token)] >= np.max(values) - 1e-6 * max(1.0, scale))


def compare_logits(candidate: Any, reference: Any) -> LogitsComparison:
    """Compare two logit vectors of one position; NaN/Inf in the candidate gives inf everywhere."""
    cand, ref = _as_float64(candidate).ravel(), _as_float64(reference).ravel()
    if cand.shape != ref.shape:
        raise ValueError(f"logits of {cand.size} tokens compared with {ref.size}")
    if not np.all(np.isfinite(cand)):
        return LogitsComparison(math.inf, False, math.inf, math.inf)
    log_ref, log_cand = _log_softmax(ref), _log_softmax(cand)
    kl = float(max(0.0, np.sum(np.exp(log_ref) * (log_ref - log_cand))))
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    top1 = is_top1(ref, int(np.argmax(cand)))
    max_abs = float(np.max(np.abs(cand - ref))) if ref.size else 0.0
    return LogitsComparison(kl, top1, max_abs, max_abs / scale if scale > 0 else max_abs)
