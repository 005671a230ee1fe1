"""The "rkllm" backend (alias ``npu``): Rockchip's RKLLM runtime on an RK3588/RK3576 NPU, seen
as a whole-model RuntimeBackend through ctypes (no extra package).

The library is the ``library=`` option, else ``$LONGCTX_RKLLM_LIBRARY``, else
``/usr/lib/librkllmrt.so``; the first of these that is given decides, and a machine without
it makes the backend unavailable, naming every place looked. Its version is checked before
anything is called (``_rkllm_abi``): 1.2.1 to 1.2.x or 1.3.x, and that version alone picks
the ABI (the structs ``rkllm_init`` and ``rkllm_run`` are declared with).

How the contract maps onto the runtime:

- ``prefill`` is one ``rkllm_run`` with RKLLM_INPUT_TOKEN, RKLLM_INFER_GET_LOGITS and
  keep_history=1, so successive prefills extend the context; the result holds one row of
  logits per input token and the last row is copied out inside the callback (the runtime
  frees it after). ``positions()`` is ``rkllm_get_kv_cache_size``; ``reset()`` is
  ``rkllm_clear_kv_cache(handle, 0, NULL, NULL)``.
- ``generate(n)`` is greedy. ``generate=logits`` (default) feeds the argmax back one token a
  run in GET_LOGITS mode: it relies on nothing prefill does not. ``generate=native`` runs the
  runtime's own decode loop (RKLLM_INFER_GENERATE, top_k=1, penalties off) with the argmax of
  the context as input, and the callback pauses the run (returns 1) when it is shown token
  n+1; it assumes the runtime feeds a token after showing it, checks that through the
  context's size, and says so when that is not how the runtime behaves. On 1.3 each run also
  carries greedy RKLLMSamplingParam (so greedy does not rest on the init parameters alone),
  native generate passes ``max_new_tokens=n`` (a runtime that does not pause stops there, not
  at the end of the context) and ``ignore_eos_token`` is set, so an end-of-sequence token does
  not end a decode early; 1.2 has none of these (its native generate can stop at EOS).
- Context limits are the runtime's, not the binding's: a prompt is passed to the runtime
  whatever its length, and what the runtime did is reported. A prompt that passes the limit
  raises ContextLimitExceeded saying whether the runtime refused it (context unchanged), took
  part of it (how many tokens), or accepted it and dropped positions (a context shift). An
  error state or a non-zero rkllm_run raises RuntimeFailure naming the state and the call.
- The model's context comes from the file name (``...-ctx16384.rkllm``; without ``ctxN`` the
  community convention says 4096), cross-checked with the runtime: ``rkllm_init`` is given
  the context asked for, and RKLLM prints the model's ``max_context_limit: N`` when it loads
  it and refuses a ``max_context_len`` above it ("max_context[16384] must be less than the
  model's max_context_limit[4096]", 1.2.1). Where the runtime states the limit, its word
  wins (a warning names a file name that disagrees); a context above the model's is clamped
  to it with a ContextClamped warning quoting what the runtime said, and a runtime that
  accepts more than the limit as known is clamped all the same, the warning saying so.
- RKLLM does not report the model's KV geometry, so ``kv_spec`` comes from ``shape=`` (a
  preset, a .toml/.json file, or key=value items separated by ``;`` inside a backend option)
  or from a preset named in the file name (``Qwen3-0.6B-...`` is ``qwen3-0.6b``), with
  ``kv_dtype=`` (default float16: an assumption, RKLLM does not state its KV storage type).
- ``stats()`` adds up the runtime's RKLLMPerfStat per run (the binding's clock around
  ``rkllm_run`` where a run reports zero time); the peak memory is the largest
  ``memory_usage_mb`` the runtime reported (its VmHWM).
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import psutil

from pytest_longctx.errors import (
    BackendUnavailable,
    ContextClamped,
    ContextLimitExceeded,
    NotSupported,
    RuntimeFailure,
    SpecError,
)
from pytest_longctx.protocol import BackendInfo, RuntimeStats
from pytest_longctx.shapes import SHAPES, parse_shape
from pytest_longctx.spec import KV_DTYPES, CacheSpec

from . import _checks as C
from . import _rkllm_abi as abi
from ._runtime import RuntimeBase

OPTIONS = ("library", "runtime_version", "shape", "kv_dtype", "vocab_size", "generate")
RUNTIME_OPTIONS = ("shape", "kv_dtype", "vocab_size", "generate")
DEFAULT_CONTEXT = 4096  # the community convention for a file name without ctxNNNN
DEFAULT_KV_DTYPE = "float16"  # assumed: RKLLM does not state how it stores K/V
GENERATE_MODES = ("logits", "native")
_CTX = re.compile(r"(?<![a-z0-9])ctx[-_]?(\d+)(k?)(?![0-9])", re.IGNORECASE)
_LIMIT_SAID = re.compile(r"max_context_limit(?:\[|:\s*)(\d+)")
# A model the runtime will not load: users' logs say "The model version is too old, please use
# the latest toolkit to reconvert the model!" and "The model target_platform does not match!".
_MODEL_VERSION = re.compile(r"model version|reconvert", re.IGNORECASE)
_FOUND_VERSION = re.compile(r"(?:model version|toolkit)\D{0,20}?v?(\d+\.\d+\.\d+)", re.IGNORECASE)
_PLATFORM = re.compile(r"target[_ ]platform", re.IGNORECASE)
_FOUND_PLATFORM = re.compile(r"target[_ ]platform\W{0,3}(r[kv]\d{4}\w*)", re.IGNORECASE)
_NAME_PLATFORM = re.compile(r"(?<![a-z0-9])(r[kv]\d{4}[a-z]?)(?![a-z0-9])", re.IGNORECASE)
_BOARD = re.compile(r"(?<!target_)platform:\s*(R[KV]\d{4}\w*)")


def context_from_name(model: str) -> Tuple[int, str]:
    """(context, where it comes from) by the file-name convention: ``ctx16384`` (or ``ctx16k``)
    in the name, else 4096."""
    name = os.path.basename(model)
    found = _CTX.findall(name)
    if not found:
        return DEFAULT_CONTEXT, f"the file name has no ctxNNNN, so {DEFAULT_CONTEXT} by convention"
    if len(set(found)) > 1:
        raise SpecError(f"model {model}: its file name gives several contexts ({', '.join(''.join(f) for f in found)})")
    digits, k = found[0]
    value = int(digits) * (1024 if k else 1)
    if value <= 0:
        raise SpecError(f"model {model}: ctx{digits}{k} in its file name is not a context")
    return value, f"ctx{digits}{k} in the file name"


def shape_from_name(model: str) -> Optional[str]:
    """The shape preset a model's file name names (``Qwen3-0.6B-w8a8-ctx16384.rkllm``), if any."""
    name = os.path.basename(model).lower().replace("_", "-")
    for preset in sorted(SHAPES, key=len, reverse=True):
        if preset in name:
            return preset
    return None


def _shape(value: Any, model: str) -> CacheSpec:
    if isinstance(value, CacheSpec):
        return value
    if value is None:
        preset = shape_from_name(model)
        if preset is None:
            raise SpecError(
                f"model {model}: RKLLM does not report the KV geometry and the file name names no known shape "
                f"({', '.join(SHAPES)}): give shape=PRESET, shape=FILE.toml or "
                "shape=n_layers=..;n_heads=..;n_kv_heads=..;head_dim=.. (';' between items in a backend option)")
        return SHAPES[preset]
    return parse_shape(str(value).replace(";", ","))


def _device_name() -> str:
    """The SoC and board from the device tree ("rockchip,rk3588 (xunlong,orangepi-5-max)")."""
    try:
        with open("/proc/device-tree/compatible", "rb") as handle:
            names = [x.decode("ascii", "replace") for x in handle.read().split(b"\0") if x]
    except OSError:
        return "unknown"
    if not names:
        return "unknown"
    return names[-1] if len(names) == 1 else f"{names[-1]} ({names[0]})"


def _driver_version() -> Optional[str]:
    for path in ("/sys/kernel/debug/rknpu/version", "/sys/module/rknpu/version"):
        try:
            with open(path, encoding="ascii", errors="replace") as handle:
                text = handle.read().strip()
        except OSError:
            continue
        if text:
            return text.split(":")[-1].strip()
    return None


def _check_settings(settings: Dict[str, Any]) -> None:
    if settings["kv_dtype"] not in KV_DTYPES:
        raise SpecError(f"kv_dtype={settings['kv_dtype']!r}, but should be one of {', '.join(KV_DTYPES)}")
    if settings["generate"] not in GENERATE_MODES:
        raise SpecError(f"generate={settings['generate']!r}, but should be one of {', '.join(GENERATE_MODES)}")
    vocab = settings["vocab_size"]
    if vocab is not None and (not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0):
        raise SpecError(f"vocab_size={vocab!r}, but should be a positive integer")


class RkllmBackend:
    """RKLLM 1.2.x or 1.3.x on a Rockchip NPU: ``--longctx-backend=rkllm[library=/path/librkllmrt.so]``.

    Options (also per ``open_runtime``, but ``library`` and ``runtime_version``):
    ``library``, ``runtime_version`` (only for a library whose binary does not name its
    version), ``shape``, ``kv_dtype`` (default float16), ``vocab_size`` (default: read from
    the first logits), ``generate`` (``logits`` or ``native``).
    """

    device_aliases = {"npu": {}}

    name = "rkllm"

    def __init__(self, library: Optional[str] = None, runtime_version: Optional[str] = None, shape: Any = None,
                 kv_dtype: str = DEFAULT_KV_DTYPE, vocab_size: Optional[int] = None,
                 generate: str = "logits") -> None:
        self._defaults: Dict[str, Any] = dict(shape=shape, kv_dtype=kv_dtype, vocab_size=vocab_size,
                                              generate=generate)
        _check_settings(self._defaults)
        if shape is not None:
            _shape(shape, "")  # a malformed shape is refused now, not at the first model
        path, self.library_source = abi.find_library(library)
        self.library = abi.open_library(path, runtime_version)

    def info(self) -> BackendInfo:
        lib = self.library
        versions = {"rkllm-runtime": lib.version, "rkllm-abi": lib.abi.name, "library": lib.path,
                    "version evidence": lib.evidence}
        driver = _driver_version()
        if driver:
            versions["rknpu-driver"] = driver
        return BackendInfo(name=self.name, device_kind="npu", device_name=_device_name(), vendor="Rockchip",
                           versions=versions, kv_dtypes=(self._defaults["kv_dtype"],))

    def open_runtime(self, model: str, context: Optional[int] = None, **options: Any) -> "RkllmRuntime":
        unknown = sorted(set(options) - set(RUNTIME_OPTIONS))
        if unknown:
            raise SpecError(f"rkllm runtime options {', '.join(unknown)} are unknown; known: {', '.join(RUNTIME_OPTIONS)}")
        settings = {**self._defaults, **options}
        _check_settings(settings)
        model = os.fspath(model)
        if not os.path.exists(model):
            raise SpecError(f"model file {model}: no such file")
        if not os.path.isfile(model):
            raise SpecError(f"model file {model}: not a file")
        if not os.access(model, os.R_OK):
            raise SpecError(f"model file {model}: not readable")
        if context is not None and (not isinstance(context, int) or isinstance(context, bool) or context <= 0):
            raise SpecError(f"context={context!r}, but should be a positive integer")
        return RkllmRuntime(self.library, model, context, settings)


@dataclass
class _Run:
    """What one rkllm_run delivered through the callback."""

    pause_after: Optional[int] = None  # pause when this many generated tokens were shown
    logits: Optional[np.ndarray] = None
    rows: int = 0
    tokens: List[int] = field(default_factory=list)
    states: List[int] = field(default_factory=list)
    perf: Optional[Tuple[float, int, float, int, float]] = None
    paused: bool = False
    exception: Optional[BaseException] = None
    status: int = 0
    seconds: float = 0.0
    log: str = ""

    @property
    def failed(self) -> bool:
        return self.status != 0 or abi.RUN_ERROR in self.states or self.exception is not None

    def failure(self, call: str) -> str:
        parts = []
        if self.status != 0:
            parts.append(f"{call.partition('(')[0]} returned {self.status}")
        if abi.RUN_ERROR in self.states:
            parts.append(f"the callback got state {abi.STATE_NAMES[abi.RUN_ERROR]}")
        if self.exception is not None:
            parts.append(f"the binding's callback raised {type(self.exception).__name__}: {self.exception}")
        words = abi.said(self.log)
        return " and ".join(parts) + (f"; the runtime said {words}" if words else "")


class RkllmRuntime(RuntimeBase):
    """One model loaded by rkllm_init, with its context (see the module docstring)."""

    def __init__(self, library: abi.Library, model: str, context: Optional[int], settings: Dict[str, Any]) -> None:
        self._lib = library.lib
        self.library = library
        self.model = model
        self._settings = settings
        self._lock = threading.RLock()
        self._capture = abi.OutputCapture()
        self._callback = abi.LLMResultCallback(self._on_result)
        self._callbacks: Any = None  # 1.3's RKLLMCallback, alive as long as the handle
        self._greedy = abi.RKLLMSamplingParam(top_k=1, top_p=1.0, temperature=1.0, repeat_penalty=1.0,
                                              frequency_penalty=0.0, presence_penalty=0.0, mirostat=0)
        self._handle: Optional[ctypes.c_void_p] = None
        self._run_state: Optional[_Run] = None
        self._next_token: Optional[int] = None
        self._rows_per_prompt: Optional[int] = None  # 1 once a run of several tokens gave one row of logits
        self._reset_stats()
        self.runtime_said_version: Optional[str] = None
        self.model_context_limit, self.context_source = context_from_name(model)
        try:
            self.context_limit = self._open(context)
            self.kv_spec: CacheSpec = _shape(settings["shape"], model).replace(
                max_positions=self.context_limit, kv_dtype=settings["kv_dtype"])
            self._set_template()
            self.vocab_size: int = settings["vocab_size"] or self._probe_vocab()
        except BaseException:
            self.close()
            raise

    # --- opening ---------------------------------------------------------------------------

    def _init(self, context: int) -> Tuple[Optional[ctypes.c_void_p], int, str]:
        param = self._lib.rkllm_createDefaultParam()
        self._path_bytes = os.fsencode(self.model)
        param.model_path = self._path_bytes
        param.max_context_len = context
        param.max_new_tokens = context  # native generate pauses long before
        param.top_k = 1  # greedy; no penalty changes the argmax
        param.top_p = 1.0
        param.temperature = 1.0
        param.repeat_penalty = 1.0
        param.frequency_penalty = 0.0
        param.presence_penalty = 0.0
        param.mirostat = 0
        param.skip_special_token = False
        param.is_async = False
        if not 1 <= param.extend_param.n_batch <= 100:
            param.extend_param.n_batch = 1
        callback: Any = self._callback
        if self.library.abi.callbacks is not None:  # 1.3: a struct of callbacks, kept alive with the handle
            param.ignore_eos_token = True  # a decode of n tokens is n tokens, whatever they are
            self._callbacks = self.library.abi.callbacks(result_callback=self._callback)
            callback = ctypes.byref(self._callbacks)
        handle = abi.LLMHandle()
        with self._capture() as said:
            status = self._lib.rkllm_init(ctypes.byref(handle), ctypes.byref(param), callback)
        log = "".join(said)
        if status != 0 or not handle.value:
            if handle.value:
                self._lib.rkllm_destroy(handle)
            return None, status, log
        return handle, status, log

    def _open(self, requested: Optional[int]) -> int:
        """Init with the context asked for; what the runtime says decides the model's limit and
        whether the context is clamped (see the module docstring)."""
        name_limit = self.model_context_limit
        context = name_limit if requested is None else requested
        handle, status, log = self._init(context)
        said_limit = _LIMIT_SAID.search(log)
        if said_limit:
            self._adopt_runtime_limit(int(said_limit.group(1)), name_limit)
        limit = self.model_context_limit
        if handle is None:
            if said_limit and context > limit:
                if requested is not None:
                    warnings.warn(ContextClamped(context, limit, f"rkllm_init refused max_context_len={context}: "
                                                                 f"{abi.said(log, 1)}"), stacklevel=4)
                return self._open_exactly(limit)
            words = abi.said(log)
            wrong = self._wrong_model(log)
            if wrong:
                raise SpecError(f"model file {self.model}: {wrong}" + (f"; the runtime said {words}" if words else ""))
            raise SpecError(
                f"model file {self.model}: rkllm_init returned {status} with max_context_len={context} (not a model "
                f"this runtime loads, or one it could not load)" + (f"; the runtime said {words}" if words else ""))
        self._handle = handle
        self._check_runtime_version(log)
        if requested is None and context != limit:  # the runtime says the model holds more than its name
            self._destroy()
            return self._open_exactly(limit)
        if context > limit:
            # The runtime took a context above the model's limit as far as the binding knows it (the
            # file name's, when the runtime did not print its own). Keep to that limit, and say both.
            self._destroy()
            warnings.warn(ContextClamped(
                context, limit,
                f"the model's limit is {self.context_source}; rkllm_init accepted max_context_len={context} too, "
                "so the converted context may be larger than that, or the runtime does not check"), stacklevel=4)
            return self._open_exactly(limit)
        return context

    def _wrong_model(self, log: str) -> Optional[str]:
        """Found vs expected for a model the runtime refused as of another toolkit version or
        platform (what it printed decides; the file name fills in what it did not name)."""
        version = self.library.version
        if _MODEL_VERSION.search(log):
            found = _FOUND_VERSION.search(log)
            seen = f"converted by rkllm-toolkit {found.group(1)}" if found else "of another version (the runtime " \
                                                                                 "does not say which)"
            series = ".".join(version.split(".")[:2])
            return (f"{seen}, but the runtime is RKLLM {version}, which expects a model converted by rkllm-toolkit "
                    f"{series}.x: reconvert it")
        if _PLATFORM.search(log):
            found = _FOUND_PLATFORM.search(log) or _NAME_PLATFORM.search(os.path.basename(self.model))
            seen = f"converted for {found.group(1).upper()}" if found else "converted for another platform"
            board = _BOARD.search(log)
            here = board.group(1) if board else _device_name()
            return f"{seen}, but this board is {here}: convert it with target_platform={here.lower()}"
        return None

    def _adopt_runtime_limit(self, said: int, name_limit: int) -> None:
        """The runtime printed the model's max_context_limit: it read it from the model, so it wins."""
        if said != name_limit:
            warnings.warn(f"model file {self.model}: {self.context_source} gives {name_limit}, but the runtime says "
                          f"the model's max_context_limit is {said}; {said} is used", stacklevel=5)
            self.context_source = f"the runtime's max_context_limit {said} ({self.context_source}: {name_limit})"
        else:
            self.context_source = f"{self.context_source}, confirmed by the runtime's max_context_limit"
        self.model_context_limit = said

    def _open_exactly(self, context: int) -> int:
        handle, status, log = self._init(context)
        if handle is None:
            raise SpecError(f"model file {self.model}: rkllm_init returned {status} with max_context_len={context}"
                            + (f"; the runtime said {abi.said(log)}" if abi.said(log) else ""))
        self._handle = handle
        self._check_runtime_version(log)
        return context

    def _check_runtime_version(self, log: str) -> None:
        said = abi.version_in_log(log)
        self.runtime_said_version = said
        if said is not None and said != self.library.version:
            self._destroy()
            raise BackendUnavailable(
                f"{self.library.path}: rkllm_init printed rkllm-runtime version {said}, but the binding took it for "
                f"{self.library.version} ({self.library.evidence}): refused")

    def _set_template(self) -> None:
        """No chat template: token input is the prompt, as given."""
        status = self._lib.rkllm_set_chat_template(self._live(), b"", b"", b"")
        if status != 0:
            warnings.warn(f"rkllm_set_chat_template(handle, \"\", \"\", \"\") returned {status}", stacklevel=3)

    def _probe_vocab(self) -> int:
        """One token in GET_LOGITS mode: the vocabulary is the width of its logits; then reset."""
        logits = self._extend(np.zeros(1, np.int32), "prefill", "reading the vocabulary size (token 0)")
        self.reset()
        self._reset_stats()
        return int(logits.shape[0])

    # --- the callback ----------------------------------------------------------------------

    def _on_result(self, result: Any, userdata: Any, state: int) -> int:
        run = self._run_state
        if run is None:
            return 0
        try:
            run.states.append(int(state))
            r = result.contents
            p = r.perf
            perf = (float(p.prefill_time_ms), int(p.prefill_tokens), float(p.generate_time_ms),
                    int(p.generate_tokens), float(p.memory_usage_mb))
            if any(perf):
                run.perf = perf
            if state == abi.RUN_ERROR:
                return 0
            if run.pause_after is not None:  # native generate: one generated token a callback
                if state in (abi.RUN_NORMAL, abi.RUN_WAITING) and r.token_id >= 0:
                    run.tokens.append(int(r.token_id))
                    if len(run.tokens) >= run.pause_after:
                        run.paused = True
                        return 1
                return 0
            logits = r.logits
            if logits.logits and logits.num_tokens > 0 and logits.vocab_size > 0:
                vocab, rows = int(logits.vocab_size), int(logits.num_tokens)
                address = ctypes.cast(logits.logits, ctypes.c_void_p).value + (rows - 1) * vocab * 4
                row = (ctypes.c_float * vocab).from_address(address)
                run.logits = np.frombuffer(row, dtype=np.float32).copy()  # the runtime frees it after
                run.rows = rows
            return 0
        except BaseException as exc:  # never let an exception unwind into the runtime
            run.exception = exc
            return 0

    # --- runs ------------------------------------------------------------------------------

    def _live(self) -> ctypes.c_void_p:
        if self._handle is None:
            raise RuntimeFailure(f"the RKLLM runtime of {self.model} is closed")
        return self._handle

    def _run(self, ids: np.ndarray, mode: int, pause_after: Optional[int] = None) -> _Run:
        handle = self._live()
        layout = self.library.abi
        inp = layout.input()
        inp.role = b"user"
        inp.enable_thinking = False
        inp.input_type = abi.INPUT_TOKEN
        inp.token_input.input_ids = ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        inp.token_input.n_tokens = int(ids.shape[0])
        infer = layout.infer()
        infer.mode = mode
        infer.keep_history = 1
        if layout.per_run_sampling:  # 1.3: greedy for this run whatever init set; at most n new tokens
            infer.sampling_params = ctypes.pointer(self._greedy)
            infer.max_new_tokens = pause_after or 0  # <= 0: the init value
        run = _Run(pause_after=pause_after)
        self._run_state = run
        try:
            with self._capture() as said:
                start = time.perf_counter()
                run.status = self._lib.rkllm_run(handle, ctypes.byref(inp), ctypes.byref(infer), None)
                run.seconds = time.perf_counter() - start
        finally:
            self._run_state = None
        run.log = "".join(said)
        return run

    @staticmethod
    def _ids(token_ids: Sequence[int]) -> np.ndarray:
        return C.token_ids(token_ids, None, np.int32)

    def _call(self, n: int, mode: int) -> str:
        return f"rkllm_run(RKLLM_INPUT_TOKEN, {abi.MODE_NAMES[mode]}, keep_history=1) of {n} tokens"

    def _limit_error(self, run: _Run, before: int, after: int, n: int, call: str, during: str) -> ContextLimitExceeded:
        if run.failed and after == before:
            detail = f"the runtime refused it: {run.failure(call)}; the context still holds {before}"
        elif run.failed:
            detail = (f"the runtime took {after - before} of the {n} tokens before failing ({run.failure(call)}): "
                      f"the context now holds {after}, not {before}")
        else:
            detail = (f"the runtime accepted it without an error and now holds {after} positions, not {before + n}: "
                      f"it dropped {before + n - after} to make room (a context shift), so the context is not as it was")
        if during:
            detail = f"{during}: {detail}"
        return ContextLimitExceeded(None, before, n, self.context_limit, detail)

    def _logits_fit(self, n: int) -> None:
        """Refuse a prompt whose logits would not fit in host memory, before the runtime allocates.

        RKLLM may hand GET_LOGITS one row per input token (n x vocab floats): with
        Qwen3's 151,936 tokens, 16384 rows are 9.3 GiB. Until a run of several tokens
        shows one row, assume every row.
        """
        vocab = getattr(self, "vocab_size", None)
        if n < 2 or vocab is None or self._rows_per_prompt == 1:
            return
        needed, free = n * vocab * 4, int(psutil.virtual_memory().available)
        if needed > free // 2:
            raise NotSupported(f"a prompt of {n} tokens would make the RKLLM runtime return {n} x {vocab} float "
                               f"logits ({needed / 2**30:.1f} GiB), more than half the {free / 2**30:.1f} GiB "
                               "of host memory available")

    def _extend(self, ids: np.ndarray, kind: str, during: str = "") -> np.ndarray:
        """One GET_LOGITS run of ids: the last row of logits, or the error the runtime's answer calls for."""
        n = int(ids.shape[0])
        self._logits_fit(n)
        call = self._call(n, abi.INFER_GET_LOGITS)
        before = self.positions()
        run = self._run(ids, abi.INFER_GET_LOGITS)
        if n > 1 and run.rows:
            self._rows_per_prompt = 1 if run.rows == 1 else None
        after = self.positions()
        if after != before + n or run.failed:
            self._next_token = None
        if before + n > self.context_limit:
            raise self._limit_error(run, before, after, n, call, during)
        where = f"{call} at position {before}" + (f" ({during})" if during else "")
        if run.failed:
            hint = (" (a model converted with less context than its file name says fails here)"
                    if "context" in run.log and after == before else "")
            raise RuntimeFailure(f"{where}: {run.failure(call)}; the context holds {after} (was {before}){hint}")
        if after != before + n:
            raise RuntimeFailure(f"{where} returned 0, but the context holds {after} positions, not {before}+{n}")
        if run.logits is None:
            raise RuntimeFailure(f"{where} returned 0 but delivered no logits to the callback")
        expected = getattr(self, "vocab_size", None)
        if expected is not None and run.logits.shape[0] != expected:
            raise RuntimeFailure(f"{where}: logits of {run.logits.shape[0]} values, but vocab_size is {expected}")
        self._account(kind, run, n)
        self._next_token = int(np.argmax(run.logits))
        return run.logits

    def _account(self, kind: str, run: _Run, tokens: int) -> None:
        perf = run.perf
        runtime_ms = (perf[0] + perf[2]) if perf else 0.0
        seconds = runtime_ms / 1e3 if runtime_ms > 0 else run.seconds
        if kind == "prefill":
            self._prefill_seconds += seconds
            self._prefill_tokens += tokens
        else:
            self._generate_seconds += seconds
            self._generate_tokens += tokens
        if perf and perf[4] > 0:
            self._peak = max(self._peak or 0, int(perf[4] * 1024 * 1024))

    def _reset_stats(self) -> None:
        self._prefill_seconds = self._generate_seconds = 0.0
        self._prefill_tokens = self._generate_tokens = 0
        self._peak: Optional[int] = None

    # --- the contract ----------------------------------------------------------------------

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        """Extend the context by these tokens; a copy of the logits of the last one (vocab_size,)."""
        ids = self._ids(token_ids)
        with self._lock:
            return self._extend(ids, "prefill").copy()

    def generate(self, n: int) -> List[int]:
        """Greedy-decode n tokens after the context, extending it by n."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n={n!r}, but should be an integer >= 0")
        with self._lock:
            if n == 0:
                return []
            if self._next_token is None:
                raise ValueError("generate needs the logits of a context: prefill first (or again after a reset)")
            if self._settings["generate"] == "native":
                return self._generate_native(n)
            tokens: List[int] = []
            for i in range(n):
                token = self._next_token
                self._extend(np.array([token], np.int32), "generate", f"generate, token {i + 1} of {n}")
                tokens.append(token)
            return tokens

    def _generate_native(self, n: int) -> List[int]:
        first = self._next_token
        ids = np.array([first], np.int32)
        call = self._call(1, abi.INFER_GENERATE)
        before = self.positions()
        run = self._run(ids, abi.INFER_GENERATE, pause_after=n)
        after = self.positions()
        self._next_token = None
        if before + n > self.context_limit:
            raise self._limit_error(run, before, after, n, call, f"generate of {n} tokens")
        where = f"{call} at position {before} (generate of {n} tokens)"
        if run.failed:
            raise RuntimeFailure(f"{where}: {run.failure(call)}; the context holds {after} (was {before})")
        if not run.paused:
            why = ("an end-of-sequence token, or max_new_tokens" if self.library.abi.per_run_sampling else
                   "an end-of-sequence token: RKLLM 1.2 has no ignore_eos_token, 1.3 has")
            raise RuntimeFailure(f"{where}: the runtime finished after showing {len(run.tokens)} of the {n} tokens "
                                 f"asked for ({why}); use generate=logits")
        if after != before + n:
            raise RuntimeFailure(
                f"{where}: paused when shown token {n + 1}, the context holds {after} positions, not {before}+{n}: "
                "generate=native assumes the runtime feeds a token after showing it to the callback, and this one "
                "does not; use generate=logits")
        self._account("generate", run, n)
        self._next_token = run.tokens[n - 1]
        return [first] + run.tokens[: n - 1]

    def positions(self) -> int:
        sizes = (ctypes.c_int * 8)()  # one int per batch; n_batch is 1
        status = self._lib.rkllm_get_kv_cache_size(self._live(), sizes)
        if status != 0:
            raise RuntimeFailure(f"rkllm_get_kv_cache_size returned {status}")
        return int(sizes[0])

    def reset(self) -> None:
        with self._lock:
            status = self._lib.rkllm_clear_kv_cache(self._live(), 0, None, None)
            self._next_token = None
            if status != 0:
                raise RuntimeFailure(f"rkllm_clear_kv_cache(handle, 0, NULL, NULL) returned {status}")
            held = self.positions()
            if held != 0:
                raise RuntimeFailure(f"rkllm_clear_kv_cache(handle, 0, NULL, NULL) returned 0, but {held} positions remain")

    def stats(self) -> RuntimeStats:
        return RuntimeStats(prefill_seconds=self._prefill_seconds, prefill_tokens=self._prefill_tokens,
                            generate_seconds=self._generate_seconds, generate_tokens=self._generate_tokens,
                            peak_memory_bytes=self._peak)

    def _destroy(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            self._lib.rkllm_destroy(handle)

    def close(self) -> None:
        with self._lock:
            self._destroy()
            self._capture.close()

    def __enter__(self) -> "RkllmRuntime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
