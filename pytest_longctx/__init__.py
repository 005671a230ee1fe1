"""pytest-longctx: certify a long-context inference backend with measured figures.

The public contract a backend implements is exported here; the pytest plugin
itself lives in ``pytest_longctx.session.plugin``. The arrows point one way: the contract
(spec, protocol, errors, rope, shapes, hookspec, questions: the flat modules) imports nothing
else of the project; ``access`` (finding and calling backends) builds on it only; then
``measure``, ``session``, ``isolation``, ``certify`` and ``tools``, each subpackage importing
only those before it. Backends and the reference import the contract only; the plugin never
imports a backend, the reference or the suite. docs/architecture.md draws the layers and
tests/test_layering.py holds them.
The package raises its own errors and uses no bare asserts, so it opts out of
assertion rewriting: PYTEST_DONT_REWRITE.
"""

from .access.registry import load_backend
from .errors import (
    BackendUnavailable,
    ContextClamped,
    ContextLimitExceeded,
    LongctxError,
    NotSupported,
    RuntimeFailure,
    SpecError,
)
from .protocol import BackendInfo, KVBackend, KVCache, ModelRuntime, RuntimeBackend, RuntimeStats
from .rope import RopeFrequencies, rope_frequencies
from .shapes import SHAPES, parse_shape
from .spec import KV_DTYPES, CacheSpec, RopeSpec

__version__ = "0.1.0"

__all__ = [
    "BackendInfo",
    "BackendUnavailable",
    "CacheSpec",
    "ContextClamped",
    "ContextLimitExceeded",
    "KVBackend",
    "KVCache",
    "KV_DTYPES",
    "LongctxError",
    "ModelRuntime",
    "NotSupported",
    "RopeFrequencies",
    "RopeSpec",
    "RuntimeBackend",
    "RuntimeFailure",
    "RuntimeStats",
    "SHAPES",
    "SpecError",
    "load_backend",
    "parse_shape",
    "rope_frequencies",
]
