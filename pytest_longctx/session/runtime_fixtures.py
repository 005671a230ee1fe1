"""Fixtures of the whole-model runtime groups: the runtime under test, opened per module.

Each runtime module gets a freshly loaded runtime, so the memory group sees
the runtime's growth from empty rather than whatever an earlier module left
in its arenas; within a module every test starts from ``reset()``.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional

import pytest

from ..access.guard import close_warned, guarded
from ..errors import BackendUnavailable, NotSupported
from ..measure.memory import memory_available
from ..measure.units import format_bytes
from ..protocol import ModelRuntime, RuntimeBackend
from .settings import Settings


def open_runtime(backend: RuntimeBackend, model: Optional[str], context: Optional[int]) -> ModelRuntime:
    """Open a runtime after checking that its model file fits in memory; a failure is one line."""
    if model is None:
        pytest.skip(f"no --longctx-model: {backend.name} is a whole-model runtime and needs a model file")
    size = os.path.getsize(model) if os.path.isfile(model) else 0
    free, place = memory_available()
    if size > free:
        pytest.skip(f"too large for this machine: model {model} is {format_bytes(size)}, "
                    f"{format_bytes(free)} free on {place}")
    try:
        with guarded(f"open_runtime({model!r}, context={context})", let=(BackendUnavailable, NotSupported)):
            return backend.open_runtime(model, context)
    except (BackendUnavailable, NotSupported) as exc:
        reason = f"{backend.name} cannot open {model}: {exc}"
    # Outside the except block, so that the report shows one line, not a chained traceback.
    pytest.skip(reason)


@pytest.fixture(scope="module")
def longctx_runtime(longctx_backend: Any, longctx_settings: Settings) -> Iterator[ModelRuntime]:
    """The model of ``--longctx-model`` loaded by the runtime backend with ``--longctx-context``.

    Example::

        def test_my_prompt(longctx_runtime):
            longctx_runtime.reset()
            logits = longctx_runtime.prefill([1, 2, 3])
    """
    runtime = open_runtime(longctx_backend, longctx_settings.model, longctx_settings.context)
    try:
        yield runtime
    finally:
        close_warned(runtime, "the runtime")  # not the last test's verdict, but never silent
