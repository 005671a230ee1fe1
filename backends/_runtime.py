"""What every whole-model runtime does alike: a context manager that closes it, calls on a
closed runtime refused with one line naming the model, and generate's argument checks.

The runtime classes (llama.cpp, OpenVINO GenAI, transformers, RKLLM) differ in what they
hold and how they free it; each says whether it is open (``_is_open``) and how it closes
(``close``). A closed runtime raises ``RuntimeFailure``, which the suite reports as a
one-line failure, rather than an AttributeError on a freed handle or a crash in native code.
"""

from __future__ import annotations

from typing import Any

from pytest_longctx.errors import RuntimeFailure


class RuntimeBase:
    """``with runtime: ...`` closes it; ``_check_open`` refuses a call once it is closed."""

    model_path: str
    _logits: Any  # the last prefill's or generated token's logits; None when empty or reset

    def _is_open(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_open(self) -> None:
        if not self._is_open():
            raise RuntimeFailure(f"the runtime of {self.model_path!r} is closed")

    def _check_generate(self, n: Any) -> None:
        """generate(n) needs a whole n >= 0 and, for n > 0, logits to take the first token from."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n={n!r}, but should be a non-negative integer")
        if n and self._logits is None:
            raise ValueError("generate needs the logits of a prefill first (the context is empty or was reset)")
