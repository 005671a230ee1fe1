"""Exceptions of the backend contract.

Backends raise these so that the suite can tell a refusal the contract asks
for (a full cache, a spec the backend cannot hold) from a defect.
"""

from __future__ import annotations


class LongctxError(Exception):
    """Base of every error the contract defines."""


class NotSupported(LongctxError):
    """A backend cannot hold this spec; the case is reported as not supported."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BackendUnavailable(LongctxError):
    """A backend cannot run on this machine (no device, driver or library).

    Every case of that backend is skipped with this reason.
    """


class ContextLimitExceeded(LongctxError):
    """An append would pass max_positions; the cache must be left as it was."""

    def __init__(self, layer: int, length: int, requested: int, max_positions: int) -> None:
        super().__init__(
            f"layer {layer}: appending {requested} positions to a cache holding {length} "
            f"would pass max_positions={max_positions}"
        )
        self.layer = layer
        self.length = length
        self.requested = requested
        self.max_positions = max_positions


class SpecError(LongctxError, ValueError):
    """A spec, shape or backend option is malformed; the message names the field."""
