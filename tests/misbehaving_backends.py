"""Backends that attack the run itself rather than a requirement: each must end in the right
verdict while the run completes and the certificate is written (issue 7).

Like ``broken_backends``, each departs from ``CorrectBackend`` by one override. Some
crash the process (a NULL dereference in native code, ``abort()``, ``_exit()``), some
hang (in Python, in a libc call a signal interrupts, on a native mutex no signal
interrupts), some game the suite (a cache of answers, a fast wrong read) or return what a careless
vendor returns (NaN past 8K positions, an integer array, read-only views) or raise
what vendor code raises (a ``BaseException`` of its own, ``SystemExit``). Name them
as ``misbehaving_backends:Segfault`` with this directory on ``sys.path``.
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any, Dict, List, Tuple

import numpy as np

from broken_backends import CorrectBackend, CorrectCache

LIBC = ctypes.CDLL(None)

# ----------------------------------------------------------------------------- crashes


class Segfault(CorrectBackend):
    """attend dereferences NULL in native code: the process dies of SIGSEGV."""

    name = "segfault"

    class Cache(CorrectCache):
        def attend(self, layer: int, q: np.ndarray) -> np.ndarray:
            ctypes.string_at(0)
            raise AssertionError("unreachable")


class SegfaultPast4096(CorrectBackend):
    """attend dereferences NULL once the cache holds more than 4096 positions (an index past a
    fixed-size table in native code): short contexts pass, longer ones kill the process."""

    name = "segfault-past-4096"

    class Cache(CorrectCache):
        def attend(self, layer: int, q: np.ndarray) -> np.ndarray:
            if self.lengths[layer] > 4096:
                ctypes.string_at(0)
            return CorrectCache.attend(self, layer, q)


class Aborts(CorrectBackend):
    """attend calls abort(), as a failed assertion in a C++ runtime does: SIGABRT."""

    name = "aborts"

    class Cache(CorrectCache):
        def attend(self, layer: int, q: np.ndarray) -> np.ndarray:
            os.abort()


class ExitsProcess(CorrectBackend):
    """attend ends the process with _exit(3), as a vendor library's fatal-error path does."""

    name = "exits-process"

    class Cache(CorrectCache):
        def attend(self, layer: int, q: np.ndarray) -> np.ndarray:
            os._exit(3)


class SegfaultOnLoad(CorrectBackend):
    """The factory itself crashes in native code (a driver probing a device)."""

    name = "segfault-on-load"

    def __init__(self) -> None:
        ctypes.string_at(0)


# ----------------------------------------------------------------------------- hangs


class SleepsInPython(CorrectBackend):
    """attend never returns: a Python loop of time.sleep (a signal can interrupt it)."""

    name = "sleeps-in-python"

    class Cache(CorrectCache):
        def attend(self, layer: int, q: np.ndarray) -> np.ndarray:
            while True:
                time.sleep(1000)


class HangsPast4096(CorrectBackend):
    """attend never returns once the cache holds more than 4096 positions (a kernel that
    deadlocks past a tile count): every later case at that length would hang again."""

    name = "hangs-past-4096"

    class Cache(CorrectCache):
        def attend(self, layer: int, q: np.ndarray) -> np.ndarray:
            while self.lengths[layer] > 4096:
                time.sleep(1000)
            return CorrectCache.attend(self, layer, q)


class SleepsInC(CorrectBackend):
    """attend never returns: libc sleep() through ctypes, retried forever (a signal makes
    sleep() return early, so the Python-level deadline still ends it)."""

    name = "sleeps-in-c"

    class Cache(CorrectCache):
        def attend(self, layer: int, q: np.ndarray) -> np.ndarray:
            while True:
                LIBC.sleep(1000)


class NativeDeadlock(CorrectBackend):
    """attend locks a native mutex it already holds: blocked in the kernel for good, no
    signal ends the wait (glibc retries a futex wait interrupted by a signal). Only ending
    the process does."""

    name = "native-deadlock"

    class Cache(CorrectCache):
        def attend(self, layer: int, q: np.ndarray) -> np.ndarray:
            mutex = ctypes.create_string_buffer(64)  # zeroed: PTHREAD_MUTEX_INITIALIZER on glibc
            LIBC.pthread_mutex_lock(mutex)
            LIBC.pthread_mutex_lock(mutex)
            raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- memory

LEAKED: List[Any] = []


class Leaks(CorrectBackend):
    """close() forgets to free: the arrays stay referenced (a pool that never returns blocks)."""

    name = "leaks"

    class Cache(CorrectCache):
        def close(self) -> None:
            LEAKED.append((self.k, self.v))
            self.k = self.v = None


# ----------------------------------------------------------------------------- gaming


class Memorises(CorrectBackend):
    """attend answers a query it has seen from a cache of earlier answers (MLPerf TEST04's
    target): right answers, but a benchmark of repeated inputs would time a dict lookup."""

    name = "memorises"

    class Cache(CorrectCache):
        def attend(self, layer: int, q: np.ndarray) -> np.ndarray:
            memo: Dict[Tuple[int, int, bytes], np.ndarray] = self.__dict__.setdefault("memo", {})
            key = (layer, self.lengths[layer], np.ascontiguousarray(q).tobytes())
            if key not in memo:
                memo[key] = super().attend(layer, q)
            return memo[key]


# ----------------------------------------------------------------------------- bad results


class NaNAfter8K(CorrectBackend):
    """attend returns NaN once the cache holds more than 8192 positions (a float16
    accumulator overflowing at long context, bug class 3)."""

    name = "nan-after-8k"

    class Cache(CorrectCache):
        def attend(self, layer: int, q: np.ndarray) -> np.ndarray:
            out = super().attend(layer, q)
            if self.lengths[layer] > 8192:
                out = out.copy()
                out[:, 1:3] = np.nan
            return out


class FastWrongReads(CorrectBackend):
    """A single-position read takes a "fast path" that returns zeros: quick, and wrong. Reads
    of windows (what the limits group checks) are right, so only a timed read shows it."""

    name = "fast-wrong-reads"

    class Cache(CorrectCache):
        def read(self, layer: int, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
            if stop - start == 1:
                shape = (1, self.spec.n_kv_heads, self.spec.head_dim)
                return np.zeros(shape, np.float32), np.zeros(shape, np.float32)
            return super().read(layer, start, stop)


class WrongDtype(CorrectBackend):
    """attend returns an integer array: the output cast where it should not be."""

    name = "wrong-dtype"

    class Cache(CorrectCache):
        def attend(self, layer: int, q: np.ndarray) -> np.ndarray:
            return super().attend(layer, q).astype(np.int32)


class ReadOnlyViews(CorrectBackend):
    """attend and read return read-only, non-contiguous views: legitimate (results are only
    read), so the suite must pass it and never write into them."""

    name = "read-only-views"

    class Cache(CorrectCache):
        def attend(self, layer: int, q: np.ndarray) -> np.ndarray:
            return _read_only_strided(super().attend(layer, q))

        def read(self, layer: int, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray]:
            k, v = super().read(layer, start, stop)
            return _read_only_strided(k), _read_only_strided(v)


def _read_only_strided(x: np.ndarray) -> np.ndarray:
    """The same values as a read-only view with doubled strides (every other element of a
    buffer twice the size)."""
    wide = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
    wide[..., ::2] = x
    view = wide[..., ::2]
    view.flags.writeable = False
    assert not view.flags.c_contiguous
    return view


class VendorAbort(BaseException):
    """A vendor's own exception that does not derive from Exception."""


class RaisesBaseException(CorrectBackend):
    """attend raises a BaseException subclass of its own, which ``except Exception`` misses."""

    name = "raises-base-exception"

    class Cache(CorrectCache):
        def attend(self, layer: int, q: np.ndarray) -> np.ndarray:
            raise VendorAbort("NPU command queue reset")


class CallsExit(CorrectBackend):
    """append calls sys.exit(), as a wrapper that treats a driver error as fatal does."""

    name = "calls-exit"

    class Cache(CorrectCache):
        def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
            raise SystemExit("rknn_run failed: -1")
