"""Preflight: whether a cache fits where it will live, asked before anything large is
allocated, so a too-large case is skipped with a one-line reason."""

from __future__ import annotations

from typing import Any, Optional

from .memory import memory_available
from .units import GiB


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def cache_preflight(backend: Any, spec: Any, working_bytes: int = 0) -> Optional[str]:
    """Whether a cache of ``spec`` (at max_positions) fits where it will live, beside
    ``working_bytes`` on the host; None if it fits, else the one-line reason."""
    needed = spec.kv_bytes(spec.max_positions)
    if backend.memory_in_use() is None:
        return preflight(needed + working_bytes)
    return preflight(working_bytes) or preflight(needed, backend)


def preflight(
    needed: int,
    backend: Any = None,
    *,
    reserve: float = 0.10,
    reserve_bytes: int = 512 << 20,
) -> Optional[str]:
    """None if ``needed`` bytes fit with a reserve to spare, else why not, in one line.

    Called before anything large is allocated, so that a too-large case is
    skipped with a reason instead of driving the host out of memory.
    """
    available, place = memory_available(backend)
    kept = max(reserve * available, reserve_bytes)
    if needed <= available - kept:
        return None
    reason = f"needs {_gib(needed)} of {place} memory, {_gib(available)} free"
    if needed <= available:
        reason += f" ({_gib(int(kept))} kept in reserve)"
    return reason
