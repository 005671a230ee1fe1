"""Public fixtures and the parametrization of the backend × kv dtype × positions matrix.

A test that asks for ``longctx_backend`` runs once per ``--longctx-backend``;
one that also asks for ``longctx_kv_dtype`` runs for every dtype that backend
claims (or ``--longctx-kv-dtype``); ``longctx_positions`` adds every positions
value. The parameters are session-scoped, so pytest groups the tests of one
case together and module- or session-scoped fixtures can build on them.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from ..access.guard import close_warned, guarded
from ..access.registry import backend_kind, declared_kind, load_backend
from ..access.runcontrol import captured
from ..errors import BackendUnavailable, NotSupported
from ..measure.bandwidth import Bandwidth, RooflineCache
from ..measure.inputs import Inputs
from ..measure.lock import ExclusiveLock
from ..measure.memory import MemoryProbe
from ..measure.preflight import cache_preflight
from ..protocol import KVBackend, KVCache
from ..spec import CacheSpec
from .options import factories_key, settings_key
from .settings import Settings

RECORD_KEY = "longctx"
# Most precise first: a check marked longctx_storage_independent runs at the first claimed.
PRECISION_ORDER = ("float32", "float16", "bfloat16", "q8_0", "fp8_e4m3", "q4_0")


def most_precise(dtypes: Tuple[str, ...]) -> Tuple[str, ...]:
    ranked = sorted(dtypes, key=lambda d: PRECISION_ORDER.index(d) if d in PRECISION_ORDER else len(PRECISION_ORDER))
    return tuple(ranked[:1])


@dataclass
class _Loaded:
    backend: Optional[KVBackend] = None
    error: Optional[BaseException] = None
    kv_dtypes: Tuple[str, ...] = ()
    kind: Optional[str] = None  # "cache" or "runtime", when it is known


@dataclass
class LongctxState:
    """Per-process state: the backends constructed once, their rooflines measured once (by
    selection text), the lock for timed sections.

    ``loader`` replaces construction in a process that must not run backend code
    (the parent of isolated cases, see ``isolate.py``: it learns ``info()`` from a
    forked child); ``runs_cases`` is False there, so it holds no timing lock.
    """

    settings: Settings
    factories: Dict[str, Any]
    lock: Optional[ExclusiveLock] = None
    loaded: Dict[str, _Loaded] = field(default_factory=dict)
    loader: Optional[Callable[[str], _Loaded]] = None
    runs_cases: bool = True
    rooflines: RooflineCache = field(default_factory=RooflineCache)

    def selection_of(self, backend: Any) -> str:
        """The selection text a loaded backend was constructed from (``cupy[device=1]``), which
        tells two backends of one class apart where their ``name`` does not."""
        for text, loaded in self.loaded.items():
            if loaded.backend is backend:
                return text
        return str(getattr(backend, "name", type(backend).__name__))

    def kind(self, text: str) -> Optional[str]:
        """"cache" or "runtime"; None when it cannot be told (a backend that failed to load and
        whose name declares nothing): such a backend's error then shows in every group."""
        return self.load(text).kind or declared_kind(text)

    def load(self, text: str) -> _Loaded:
        if text not in self.loaded:
            if self.loader is not None:
                self.loaded[text] = self.loader(text)
                return self.loaded[text]
            with captured() as caught:  # an error is reported on every case of this backend
                backend = load_backend(text, self.factories)
                self.loaded[text] = _Loaded(backend, None, tuple(backend.info().kv_dtypes), backend_kind(backend))
            if caught.error is not None:
                self.loaded[text] = _Loaded(None, caught.error)
        return self.loaded[text]


state_key = pytest.StashKey[LongctxState]()
# Every length a context search may ask for, set by the finder (finder.py) before collection;
# the positions to parametrize with instead of --longctx-positions. Set here, not imported from
# the finder, which builds on this module.
searched_positions_key = pytest.StashKey[Tuple[int, ...]]()


def get_state(config: pytest.Config) -> LongctxState:
    if state_key not in config.stash:
        config.stash[state_key] = LongctxState(config.stash[settings_key], config.stash[factories_key])
    return config.stash[state_key]


def bandwidth_of(config: pytest.Config, backend: Any) -> Bandwidth:
    """A loaded backend's memory bandwidth, measured once per run and selection text (not
    per name: ``cupy[device=1]`` is not ``cupy``'s GPU)."""
    state = get_state(config)
    return state.rooflines.bandwidth(state.selection_of(backend), backend)


# A case of the other kind of backend (a KV-cache group on a whole-model runtime, or the
# reverse) is deselected at collection rather than skipped: it is not a claim left unproven.
OTHER_KIND = "longctx_other_kind"


def _applies(state: "LongctxState", text: str, kind: str) -> bool:
    return state.kind(text) in (kind, None)


def _case_param(value: Any, applies: bool, **kwargs: Any) -> Any:
    return pytest.param(*value if isinstance(value, tuple) else (value,),
                        marks=() if applies else getattr(pytest.mark, OTHER_KIND), **kwargs)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    names = metafunc.fixturenames
    if "longctx_backend" not in names:
        return
    state = get_state(metafunc.config)
    settings = state.settings
    kind = "runtime" if "longctx_runtime" in names else "cache"
    if "longctx_kv_dtype" in names:
        one = metafunc.definition.get_closest_marker("longctx_storage_independent") is not None
        pairs = []
        for text in settings.backends:
            if not _applies(state, text, kind):
                pairs.append(_case_param((text, "-"), False, id=f"{text}--"))
                continue
            loaded = state.load(text)
            dtypes = settings.kv_dtypes or loaded.kv_dtypes or ("unavailable",)
            dtypes = most_precise(dtypes) if one else dtypes
            pairs.extend(_case_param((text, dtype), True, id=f"{text}-{dtype}") for dtype in dtypes)
        metafunc.parametrize(["longctx_backend", "longctx_kv_dtype"], pairs,
                             indirect=["longctx_backend"], scope="session")
    else:
        backends = [_case_param(text, _applies(state, text, kind), id=text) for text in settings.backends]
        metafunc.parametrize("longctx_backend", backends, indirect=True, scope="session")
    if "longctx_positions" in names:
        positions = settings.positions
        if searched_positions_key in metafunc.config.stash:
            positions = metafunc.config.stash[searched_positions_key]
        elif metafunc.definition.get_closest_marker("longctx_longest_only") is not None:
            positions = (max(positions),)
        metafunc.parametrize("longctx_positions", positions, scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    other = [item for item in items if item.get_closest_marker(OTHER_KIND) is not None]
    if other:
        config.hook.pytest_deselected(items=other)
        items[:] = [item for item in items if item.get_closest_marker(OTHER_KIND) is None]


@pytest.fixture(scope="session")
def longctx_settings(pytestconfig: pytest.Config) -> Settings:
    """The run's settings: shape, positions, seed and every bar the suite applies."""
    return pytestconfig.stash[settings_key]


@pytest.fixture(scope="session")
def longctx_backend(request: pytest.FixtureRequest) -> KVBackend:
    """The backend under test, constructed once per run.

    Example::

        def test_my_long_prompt(longctx_backend, longctx_spec):
            cache = longctx_backend.open_cache(longctx_spec)
    """
    text = getattr(request, "param", None) or get_state(request.config).settings.backends[0]
    loaded = get_state(request.config).load(text)
    if isinstance(loaded.error, BackendUnavailable):
        pytest.skip(f"backend {text!r} unavailable: {loaded.error}")
    if loaded.error is not None:
        pytest.fail(f"backend {text!r} could not be loaded: {loaded.error}", pytrace=False)
    return loaded.backend


@pytest.fixture
def longctx_spec(request: pytest.FixtureRequest, longctx_settings: Settings) -> CacheSpec:
    """The CacheSpec in force: the shape at this case's kv dtype and positions.

    Outside the matrix, the first ``--longctx-kv-dtype`` or the backend's most
    precise claimed dtype, and the largest positions value.
    """
    dtype = _param(request, "longctx_kv_dtype")
    if dtype is None and longctx_settings.kv_dtypes:
        dtype = longctx_settings.kv_dtypes[0]
    if dtype is None:
        claimed = request.getfixturevalue("longctx_backend").info().kv_dtypes
        dtype = (most_precise(tuple(claimed)) or ("float16",))[0]
    positions = _param(request, "longctx_positions") or max(longctx_settings.positions)
    return longctx_settings.spec_for(dtype, positions)


def _param(request: pytest.FixtureRequest, name: str) -> Any:
    if name in request.fixturenames:
        return request.getfixturevalue(name)
    return None


def skip_unless_fits(backend: KVBackend, spec: CacheSpec, working_bytes: int = 0) -> None:
    """Skip, with the bytes needed and free, a case whose cache (where it lives) and working
    set (on the host: inputs, the reference) would not fit. Call it before allocating."""
    reason = cache_preflight(backend, spec, working_bytes)
    if reason is not None:
        pytest.skip(f"too large for this machine: {reason} ({spec.describe()}, {spec.max_positions} positions)")


def open_cache(backend: KVBackend, spec: CacheSpec, working_bytes: int = 0) -> KVCache:
    """Open a cache after checking that it fits; skip if it does not or is not supported.

    ``working_bytes`` is what the test itself will allocate beside the cache
    (inputs, reference working set), counted in the host check.
    """
    skip_unless_fits(backend, spec, working_bytes)
    try:
        with guarded("open_cache", where=spec.describe(), let=(NotSupported,)):
            return backend.open_cache(spec)
    except NotSupported as exc:
        pytest.skip(f"not supported: {exc.reason}")


@contextlib.contextmanager
def opened(backend: KVBackend, spec: CacheSpec, working_bytes: int = 0) -> Iterator[KVCache]:
    cache = open_cache(backend, spec, working_bytes)
    try:
        yield cache
    finally:
        # What close() raises is not this case's verdict (the memory group judges leaks): a warning.
        close_warned(cache, "the cache")


@pytest.fixture
def longctx_cache(longctx_backend: KVBackend, longctx_spec: CacheSpec) -> Iterator[KVCache]:
    """A fresh, empty cache of ``longctx_spec``, closed after the test.

    Skipped with the bytes needed and free when it would not fit, and as not
    supported when the backend refuses the spec.
    """
    with opened(longctx_backend, longctx_spec) as cache:
        yield cache


@pytest.fixture
def longctx_inputs(request: pytest.FixtureRequest, longctx_settings: Settings) -> Inputs:
    """Seeded generators for K/V/Q, timed-call pools and needles; the seed is the run's."""
    return Inputs(longctx_settings.seed, request.node.nodeid)


class Measure:
    """Timers, memory probes and bandwidth for one backend, and a recorder of figures."""

    def __init__(self, node: pytest.Item, backend: KVBackend, lock: ExclusiveLock) -> None:
        self._node = node
        self.backend = backend
        self._lock = lock

    def memory(self) -> MemoryProbe:
        return MemoryProbe(self.backend)

    def bandwidth(self) -> Bandwidth:
        """The device's memory bandwidth, probed once per process and backend selection."""
        with self._lock.exclusive():
            return bandwidth_of(self._node.config, self.backend)

    def exclusive(self) -> Any:
        """Hold while timing, so that pytest-xdist workers do not measure against each other."""
        return self._lock.exclusive()

    def record(self, check: str, value: float, unit: str, *, bound: str = "", passed: bool = True,
               cell: str = "", **extra: Any) -> None:
        """Attach a figure to the test report.

        It rides in ``user_properties`` as JSON text: plain data that crosses
        pytest-xdist, and readable where ``--junitxml`` writes it as a property.
        """
        params = getattr(getattr(self._node, "callspec", None), "params", {})
        record = {
            "backend": params.get("longctx_backend", self.backend.name),
            "kv_dtype": params.get("longctx_kv_dtype", ""),
            "positions": params.get("longctx_positions", extra.pop("positions", "")),
            "check": check,
            "value": value,
            "unit": unit,
            "bound": bound,
            "passed": passed,
            "cell": cell or f"{value:.4g} {unit}",
            **extra,
        }
        self._node.user_properties.append((RECORD_KEY, json.dumps(record, default=_plain)))


def timing_lock(config: pytest.Config) -> ExclusiveLock:
    """One lock file for the run, shared by pytest-xdist workers (same test-run id)."""
    state = get_state(config)
    if state.lock is None:
        run = getattr(config, "workerinput", {}).get("testrunuid", str(os.getpid()))
        state.lock = ExclusiveLock(os.path.join(tempfile.gettempdir(), f"pytest-longctx-{run}.lock"))
    return state.lock


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Optional[pytest.Item]) -> Any:
    """Every case of the matrix, fixtures included, holds the timing lock shared; a timed
    section takes it exclusive, so no other worker's case runs while it measures."""
    if "longctx_backend" not in getattr(item, "fixturenames", ()) or not get_state(item.config).runs_cases:
        return (yield)
    with timing_lock(item.config).shared():
        return (yield)


@pytest.fixture(scope="session")
def _longctx_lock(pytestconfig: pytest.Config) -> ExclusiveLock:
    return timing_lock(pytestconfig)


@pytest.fixture
def longctx_measure(request: pytest.FixtureRequest, longctx_backend: KVBackend,
                    _longctx_lock: ExclusiveLock) -> Measure:
    """Timers and memory probes that know the device, and ``record()`` for figures."""
    return Measure(request.node, longctx_backend, _longctx_lock)


def _plain(value: Any) -> Any:
    """NumPy scalars and other numbers as JSON numbers; anything else as text."""
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    return str(value)


def records_of(report: pytest.TestReport) -> List[Dict[str, Any]]:
    """The figures a report carries (JSON text; a dict from older recorders is taken as is)."""
    return [json.loads(value) if isinstance(value, str) else value
            for key, value in report.user_properties if key == RECORD_KEY]
