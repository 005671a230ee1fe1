"""The one guard around backend calls: what is the backend's fails one case in one line, what
is the run's (Ctrl-C, pytest's outcomes) passes through, and a failed close() is a warning."""

from __future__ import annotations

import pytest

from pytest_longctx.access.guard import CloseWarning, call, close_warned, guarded
from pytest_longctx.access.registry import BackendLoadError, load_backend
from pytest_longctx.access.runcontrol import captured


class VendorAbort(BaseException):
    """A vendor's own BaseException subclass: neither Exception nor run control."""


@pytest.mark.parametrize("exc", [RuntimeError("driver"), SystemExit("rknn_run failed: -1"), VendorAbort("queue")])
def test_what_the_backend_raises_is_captured(exc: BaseException) -> None:
    with captured() as caught:
        raise exc
    assert caught.error is exc


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), pytest.skip.Exception("skip"), pytest.fail.Exception("verdict"),
                                 pytest.exit.Exception("stop")])
def test_run_control_passes_through(exc: BaseException) -> None:
    with pytest.raises(type(exc)):
        with captured():
            raise exc


def test_types_the_caller_handles_pass_through() -> None:
    with pytest.raises(LookupError):
        with captured(LookupError):
            raise KeyError("k")


def test_guarded_fails_with_one_line_naming_call_exception_and_expectation() -> None:
    with pytest.raises(pytest.fail.Exception) as info:
        with guarded("append at max_positions", "ContextLimitExceeded", "numpy float32 @ 4096 positions"):
            raise SystemExit("rknn_run failed: -1\nsecond line")
    assert str(info.value) == ("append at max_positions raised SystemExit: rknn_run failed: -1 …, "
                               "but should be ContextLimitExceeded [numpy float32 @ 4096 positions]")
    assert info.value.pytrace is False and info.value.__suppress_context__


def test_call_returns_the_value_and_fails_on_a_raise() -> None:
    assert call("length", lambda layer: layer + 1, 4) == 5
    with pytest.raises(pytest.fail.Exception, match=r"^attend\(layer 0\) raised VendorAbort: queue reset$"):
        call("attend(layer 0)", lambda: (_ for _ in ()).throw(VendorAbort("queue reset")))


class _Closing:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def close(self) -> None:
        raise self.exc


def test_a_failed_close_is_one_warning_line() -> None:
    with pytest.warns(CloseWarning) as record:
        close_warned(_Closing(SystemExit("rkllm_destroy failed: -2")), "the runtime")
    assert [str(w.message) for w in record] == ["close() of the runtime raised SystemExit: rkllm_destroy failed: -2"]


def test_ctrl_c_in_close_is_not_turned_into_a_warning() -> None:
    with pytest.raises(KeyboardInterrupt):
        close_warned(_Closing(KeyboardInterrupt()), "the cache")


def test_a_factory_raising_a_vendor_base_exception_is_a_load_error() -> None:
    """It escaped as VendorAbort when the registry caught (Exception, SystemExit) only."""
    def factory() -> None:
        raise VendorAbort("NPU firmware mismatch")

    with pytest.raises(BackendLoadError, match="factory raised VendorAbort: NPU firmware mismatch"):
        load_backend("vendor", {"vendor": factory})
