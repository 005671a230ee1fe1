"""Unit tests of the comparison metrics and the factor x plain + floor verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pytest_longctx.measure.metrics import compare, judge

REFERENCE = np.array([1.0, 2.0, 3.0, 4.0])


def test_compare_identical() -> None:
    got = compare(REFERENCE.astype(np.float32), REFERENCE)
    assert (got.max_abs, got.nmse, got.nonfinite, got.where) == (0.0, 0.0, 0, None)
    assert got.shape_ok and got.message == ""


def test_compare_known_error() -> None:
    candidate = REFERENCE.copy()
    candidate[1] += 0.5
    got = compare(candidate, REFERENCE)
    assert got.max_abs == pytest.approx(0.5)
    assert got.where == (1,)
    assert got.nmse == pytest.approx(0.25 / 30.0)  # (0.25 / 4) / (30 / 4)


def test_compare_index_is_multidimensional() -> None:
    reference = np.zeros((2, 3, 4))
    candidate = reference.copy()
    candidate[1, 2, 3] = -7.0
    candidate[0, 0, 0] = 1.0
    got = compare(candidate, reference)
    assert (got.max_abs, got.where) == (7.0, (1, 2, 3))


def test_compare_zero_reference() -> None:
    assert compare(np.zeros(3), np.zeros(3)).nmse == 0.0
    assert compare(np.ones(3), np.zeros(3)).nmse == math.inf


def test_compare_counts_nan_and_inf() -> None:
    candidate = REFERENCE.copy()
    candidate[2], candidate[3] = np.nan, np.inf
    got = compare(candidate, REFERENCE)
    assert got.nonfinite == 2
    assert got.max_abs == math.inf and got.nmse == math.inf
    assert got.where == (2,)


def test_compare_reports_shape_mismatch() -> None:
    got = compare(np.zeros((2, 3)), np.zeros((3, 2)))
    assert not got.shape_ok
    assert got.message == "shape (2, 3), but should be (3, 2)"
    assert got.max_abs == math.inf


def test_compare_empty() -> None:
    got = compare(np.zeros((0, 4)), np.zeros((0, 4)))
    assert (got.max_abs, got.nmse, got.where) == (0.0, 0.0, None)


def test_judge_failure_message() -> None:
    plain = REFERENCE + np.array([1.2e-4, 0.0, 0.0, 0.0])
    candidate = REFERENCE + np.array([0.0, 3.1e-2, 0.0, 0.0])
    verdict = judge(candidate, REFERENCE, plain, factor=3, floor=1e-6)
    assert not verdict.passed
    assert verdict.error == pytest.approx(3.1e-2)
    assert verdict.allowed == pytest.approx(3 * 1.2e-4 + 1e-6)
    assert verdict.where == (1,)
    assert verdict.message("attention output", "gqa-8k-fp16") == (
        "attention output: max|error|=3.1e-02 (NMSE 3.2e-05), but should be "
        "<= 3 x plain 1.2e-04 + 1.0e-06 = 3.6e-04 [gqa-8k-fp16]"
    )


def test_judge_pass() -> None:
    plain = REFERENCE + np.array([1e-3, 0.0, 0.0, 0.0])
    candidate = (REFERENCE + np.array([0.0, 1.5e-3, 0.0, 0.0])).astype(np.float32)
    verdict = judge(candidate, REFERENCE, plain, factor=2, floor=1e-5)
    assert verdict.passed
    assert "within 2 x plain 1.0e-03" in verdict.message("out", "case")


def test_judge_fails_on_nan_even_within_bound() -> None:
    candidate = REFERENCE.copy()
    candidate[0] = np.nan
    verdict = judge(candidate, REFERENCE, REFERENCE, factor=1e30, floor=1e30)
    assert not verdict.passed
    assert verdict.message("out", "c") == "out: has 1 NaN/Inf value, the first at index (0,), but should have none [c]"
    candidate[0], candidate[2], candidate[3] = 1.0, -np.inf, np.nan
    assert judge(candidate, REFERENCE, REFERENCE, factor=2, floor=0).message("out", "c") == (
        "out: has 2 NaN/Inf values, the first at index (2,), but should have none [c]"
    )


def test_judge_fails_on_shape_mismatch() -> None:
    verdict = judge(np.zeros((4, 1)), REFERENCE, REFERENCE, factor=2, floor=1.0)
    assert not verdict.passed
    assert verdict.message("out", "c") == "out: shape (4, 1), but should be (4,) [c]"


def test_judge_absolute_bound_and_bad_baseline() -> None:
    assert judge(REFERENCE + 1e-7, REFERENCE, None, factor=2, floor=1e-6).passed
    with pytest.raises(ValueError, match="internal"):
        judge(REFERENCE, REFERENCE, np.full(4, np.nan), factor=2, floor=0)
    with pytest.raises(ValueError):
        judge(REFERENCE, REFERENCE, REFERENCE, factor=-1, floor=0)
