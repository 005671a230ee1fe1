"""What the backend tests share: a pytester run of the installed suite, its failed test names,
small specs and K/V for direct calls, the RoPE cases, the full-cache check, and an import that fails.

Each backend's tests ask the same things of the suite (run it on the backend, narrowed by
``-m``/``-k``, and read what failed); written once here, a change to how the suite is run
(an option every run needs, where the stand-in backends live) is made in one place.
"""

from __future__ import annotations

import builtins
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest

from pytest_longctx import conformance
from pytest_longctx.errors import ContextLimitExceeded
from pytest_longctx.protocol import KVCache
from pytest_longctx.spec import CacheSpec, RopeSpec

TESTS_DIR = Path(__file__).parent
SUITE_DIR = os.path.dirname(conformance.__file__)
SHAPE = "n_layers=2,n_heads=8,n_kv_heads=2,head_dim=64,theta=10000"

# RoPE cases of the direct-call tests: every kind, partial rotation and both pairings, at
# original contexts short enough that a test of a few hundred positions crosses them.
ROPES: Dict[str, RopeSpec] = {
    "none": RopeSpec(kind="none"),
    "default": RopeSpec(theta=10000.0),
    "gptj": RopeSpec(theta=10000.0, style="gptj"),
    "partial": RopeSpec(theta=10000.0, rotary_dim=16),
    "partial-gptj": RopeSpec(theta=10000.0, rotary_dim=16, style="gptj"),
    "linear": RopeSpec(kind="linear", theta=10000.0, factor=4.0),
    "dynamic": RopeSpec(kind="dynamic", theta=10000.0, factor=2.0, original_max_positions=128),
    "yarn": RopeSpec(kind="yarn", theta=1e6, factor=4.0, original_max_positions=64),
    "longrope": RopeSpec(
        kind="longrope", theta=10000.0, original_max_positions=64,
        short_factor=tuple(1.0 + 0.05 * j for j in range(32)),
        long_factor=tuple(1.0 + 2.0 * j for j in range(32)),
    ),
    "llama3": RopeSpec(
        kind="llama3", theta=500000.0, factor=8.0, original_max_positions=64,
        low_freq_factor=1.0, high_freq_factor=4.0,
    ),
}


def suite_module(name: str = "") -> str:
    """The path of the installed suite, or of one of its modules (``test_limits.py``)."""
    return os.path.join(SUITE_DIR, name) if name else SUITE_DIR


# The rate floors off, for runs that assert no failure: the checks of correctness and cost
# shape (fill growth, deferred work, cached answers) still run; a floor missed on a loaded
# host is the throughput group's own business (judged or skipped as contended there).
FLOORS_OFF = ("--longctx-fill-floor=0", "--longctx-retrieve-floor=0")


def run_suite(pytester: pytest.Pytester, backend: str, *args: str, shape: Optional[str] = SHAPE,
              positions: str = "1024", module: Optional[str] = "", model: Optional[Any] = None,
              subprocess: bool = False) -> pytest.RunResult:
    """The installed suite on ``backend``, the stand-in backends of tests/ importable.

    ``module``: one module of the suite, "" the whole of it by path, None by the plugin (no
    path given); ``shape`` None leaves the shape to the backend (a runtime's model has one);
    ``model``: --longctx-model. ``subprocess``: a fresh interpreter (it finds tests/ through
    PYTHONPATH, which the caller sets), where memory is measured or a native crash may end it."""
    pytester.syspathinsert(TESTS_DIR)
    where = [] if module is None else [suite_module(module)]
    sized = [] if shape is None else [f"--longctx-shape={shape}"]
    loaded = [] if model is None else [f"--longctx-model={model}"]
    runner = pytester.runpytest_subprocess if subprocess else pytester.runpytest
    return runner(*where, "-p", "no:cacheprovider", f"--longctx-backend={backend}", *loaded, *sized,
                  f"--longctx-positions={positions}", *args)


def failed_tests(result: pytest.RunResult) -> List[str]:
    """The names (without parameters) of the tests a run reports FAILED, in report order."""
    return [line.split("::")[1].split("[")[0] for line in result.outlines if line.startswith("FAILED ")]


def small_spec(kv_dtype: str = "float32", positions: int = 1200, **fields: Any) -> CacheSpec:
    """The tests' small cache: 2 layers, 8 query heads over 2 KV heads of 64, default RoPE."""
    rope = fields.pop("rope", RopeSpec(theta=10000.0))
    base = dict(n_layers=2, n_heads=8, n_kv_heads=2, head_dim=64, max_positions=positions)
    base.update(fields)
    return CacheSpec(**base, kv_dtype=kv_dtype, rope=rope)


def kv(spec: CacheSpec, n: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Random float32 K and V for n positions of ``spec``."""
    rng = np.random.default_rng(seed)
    shape = (n, spec.n_kv_heads, spec.head_dim)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


def failing_import(monkeypatch: pytest.MonkeyPatch, exc: BaseException, *names: str) -> None:
    """Make importing any of ``names`` (or a submodule of one) raise ``exc``, as on a machine
    without that package or with a broken build of it."""
    real_import = builtins.__import__

    def fake(name: str, *args: Any, **kwargs: Any) -> Any:
        if any(name == n or name.startswith(n + ".") for n in names):
            raise exc
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


def check_refuses_when_full(cache: KVCache) -> None:
    """On a fresh cache of 40 positions: 30 appended, then 11 more refused with
    ContextLimitExceeded and nothing changed, then the 10 that fit taken, in layer 0 only."""
    assert cache.spec.max_positions == 40
    k, v = kv(cache.spec, 41)
    cache.append(0, k[:30], v[:30])
    before = cache.read(0, 0, 30)
    with pytest.raises(ContextLimitExceeded):
        cache.append(0, k[30:41], v[30:41])
    assert cache.length(0) == 30
    assert all(np.array_equal(a, b) for a, b in zip(before, cache.read(0, 0, 30)))
    cache.append(0, k[30:40], v[30:40])
    assert cache.length(0) == 40 and cache.length(1) == 0
