"""Exceptions of the backend contract.

Backends raise these so that the suite can tell a refusal the contract asks
for (a full cache, a spec the backend cannot hold) from a defect.
"""

from __future__ import annotations

from typing import Optional


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
    """An append or a prompt would pass the context limit; what is held must stay as it was.

    A KV cache names the layer; a whole-model runtime passes ``layer=None``.
    """

    def __init__(self, layer: Optional[int], length: int, requested: int, max_positions: int,
                 detail: str = "") -> None:
        where = f"layer {layer}: appending {requested} positions to a cache" if layer is not None \
            else f"a prompt of {requested} tokens to a context"
        super().__init__(
            f"{where} holding {length} would pass max_positions={max_positions}"
            + (f" ({detail})" if detail else "")
        )
        self.layer = layer
        self.length = length
        self.requested = requested
        self.max_positions = max_positions


class SpecError(LongctxError, ValueError):
    """A spec, shape or backend option is malformed; the message names the field."""


class RuntimeFailure(LongctxError):
    """A whole-model runtime reported an error state; the message names the state and the call."""


class ContextClamped(UserWarning):
    """A runtime was asked for more context than its model holds and took the model's limit."""

    def __init__(self, requested: int, limit: int, detail: str = "") -> None:
        super().__init__(
            f"context {requested} requested, but the model holds {limit}: clamped to {limit}"
            + (f" ({detail})" if detail else "")
        )
        self.requested = requested
        self.limit = limit
