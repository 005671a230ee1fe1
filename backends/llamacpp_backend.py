"""The "llamacpp" backend: a GGUF model run by llama.cpp through llama-cpp-python.

A whole-model runtime (``RuntimeBackend``): the suite sees token ids, logits,
positions and statistics, never the KV cache. It drives llama.cpp's C API as
llama-cpp-python exposes it (``llama_cpp.llama_cpp``), not the high-level
``Llama`` class, so that every ``llama_decode`` return code reaches the suite
and nothing (chat templates, samplers, its own token bookkeeping) stands
between the contract and llama.cpp.

What it reports and why:

- ``model_context_limit`` is the GGUF's ``<arch>.context_length`` (the training
  context), read through ``llama_model_meta_val_str``.
- ``context_limit`` is the ``n_ctx`` llama.cpp put in force (``llama_n_ctx``):
  llama.cpp rounds the requested context up to a multiple of 256.
- A context above the model's limit is clamped to it with a ``ContextClamped``
  warning naming both numbers. llama.cpp itself accepts it with one log line
  ("possible training context overflow") and then attends past what the model
  was trained on; a certification run should measure the model's own window,
  and a clamp (unlike a refusal) lets a run that asked for too much go on and
  say so. Where the training context is not a multiple of 256, the largest
  multiple below it is taken, with the same warning.
- ``kv_spec`` comes from the GGUF's hyperparameters (``block_count``,
  ``attention.head_count``, ``attention.head_count_kv``, ``attention.key_length``
  or ``embedding_length / head_count``) and the cache type in force: f32,
  f16, q8_0, q4_0 map to the contract's float32, float16, q8_0, q4_0, so ``kv_bytes`` counts the q8_0/q4_0 block scales llama.cpp stores.
  K and V must be of one type (the contract has one ``kv_dtype``), and a
  quantized V needs flash attention, as llama.cpp requires.
- A prompt is given to llama.cpp as llama.cpp's own tools give it: batches of
  ``n_batch`` tokens, one ``llama_decode`` each. Nothing is checked before:
  when a batch finds no room (``llama_decode`` returns 1, "failed to find a
  memory slot"), that batch is rolled back by llama.cpp but the batches before
  it stay, and the binding raises ``ContextLimitExceeded`` saying how many of
  the prompt's tokens llama.cpp applied. ``positions()`` is llama.cpp's own
  count (``llama_memory_seq_pos_max + 1``), so it tells the truth after a
  refusal; the suite's limits group judges whether the refusal was whole.
- ``stats()`` comes from the binding's own timers (``time.perf_counter`` around
  the ``llama_decode`` calls and the logits read that waits for them), not from
  ``llama_perf_context``: llama.cpp's counters file a 1-token batch as
  generation and a longer one as prompt whatever the caller meant, count the
  tokens of a refused batch, and report at least 1 token of each kind.
  ``perf()`` returns llama.cpp's counters for comparison.

Any other non-zero return code of llama.cpp is a ``RuntimeFailure`` naming the
call, the code, what it means, where in the prompt it happened and llama.cpp's
last log lines. llama.cpp's logging is captured (the last lines are kept for
those messages) and printed only with ``verbose=true``; the log hook is
process-wide, so the last backend constructed decides.

llama_cpp is imported when the backend is constructed: without it (or with a
library it cannot load) the backend is unavailable, with the reason.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import sys
import time
import warnings
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np

from pytest_longctx.errors import (
    BackendUnavailable, ContextClamped, ContextLimitExceeded, NotSupported, RuntimeFailure, SpecError,
)
from pytest_longctx.protocol import BackendInfo, RuntimeStats
from pytest_longctx.spec import KV_DTYPES, CacheSpec, RopeSpec

from . import _checks as C
from ._host import available_cores, cpu_name, one_line
from ._runtime import RuntimeBase

OPTIONS = ("kv_type", "type_k", "type_v", "flash_attn", "n_threads", "n_batch", "n_ubatch", "verbose")

# llama.cpp's cache type names -> (ggml type constant in llama_cpp, the contract's kv_dtype).
# Not bf16: llama-cpp-python (0.3.36) does not declare GGML_TYPE_BF16.
CACHE_TYPES: Dict[str, Tuple[str, str]] = {
    "f32": ("GGML_TYPE_F32", "float32"),
    "f16": ("GGML_TYPE_F16", "float16"),
    "q8_0": ("GGML_TYPE_Q8_0", "q8_0"),
    "q4_0": ("GGML_TYPE_Q4_0", "q4_0"),
}
_BY_DTYPE = {dtype: name for name, (_, dtype) in CACHE_TYPES.items()}
QUANTIZED = ("q8_0", "q4_0")

# llama_context rounds n_ctx up: cparams.n_ctx = GGML_PAD(n_ctx, 256) (llama-context.cpp).
N_CTX_PAD = 256

# What llama_decode's return codes mean (llama.h).
DECODE_CODES = {
    1: "could not find a memory slot for the batch",
    2: "aborted",
    -1: "invalid input batch",
}

# The C API this binding calls; a llama_cpp without one of them is an older or other ABI.
REQUIRED = (
    "llama_backend_init", "llama_model_default_params", "llama_model_load_from_file", "llama_model_free",
    "llama_context_default_params", "llama_init_from_model", "llama_free", "llama_n_ctx", "llama_decode",
    "llama_batch_init", "llama_batch_free", "llama_get_logits_ith", "llama_get_memory", "llama_memory_clear",
    "llama_memory_seq_pos_max", "llama_model_get_vocab", "llama_vocab_n_tokens", "llama_model_meta_val_str",
    "llama_model_n_ctx_train", "llama_model_rope_type", "llama_log_set", "llama_perf_context",
    "llama_set_n_threads",
)

_LOG_LINES = 20


class _Log:
    """llama.cpp's log lines: the last few kept for error messages, printed only when verbose."""

    def __init__(self) -> None:
        self.lines: Deque[str] = collections.deque(maxlen=_LOG_LINES)
        self.verbose = False
        self._partial = ""
        self.callback: Any = None  # the ctypes callback object, kept alive while installed

    def install(self, llama: Any, verbose: bool) -> None:
        self.verbose = verbose
        if self.callback is None:
            def on_log(level: int, text: bytes, _user: Any) -> None:
                message = text.decode("utf-8", errors="replace") if text else ""
                if self.verbose:
                    sys.stderr.write(message)
                self._partial += message
                while "\n" in self._partial:
                    line, self._partial = self._partial.split("\n", 1)
                    if line.strip():
                        self.lines.append(line.strip())

            self.callback = llama.llama_log_callback(on_log)
            llama.llama_log_set(self.callback, ctypes.c_void_p(0))

    def clear(self) -> None:
        """Forget earlier lines, so that a message quotes what the call at hand logged."""
        self.lines.clear()
        self._partial = ""

    def tail(self, n: int = 3) -> str:
        lines = list(self.lines)[-n:]
        return " | ".join(lines) if lines else "no log line"


_LOG = _Log()


def _import_llama() -> Tuple[Any, Any]:
    """llama_cpp (the package, for its version) and llama_cpp.llama_cpp (the C API)."""
    try:
        import llama_cpp
        from llama_cpp import llama_cpp as capi
    except ImportError as exc:
        raise BackendUnavailable(
            f"llama_cpp is not installed ({exc}); pip install 'pytest-longctx[llamacpp]'"
        ) from None
    except (OSError, RuntimeError, AttributeError) as exc:  # its libllama failed to load or lacks a symbol
        raise BackendUnavailable(
            f"llama_cpp is installed but its llama.cpp library cannot be loaded: {type(exc).__name__}: "
            f"{one_line(exc)}; reinstall llama-cpp-python for this machine (pip install --force-reinstall "
            f"--no-cache-dir llama-cpp-python)"
        ) from None
    missing = [name for name in REQUIRED if not hasattr(capi, name)]
    if missing:
        version = getattr(llama_cpp, "__version__", "unknown")
        raise BackendUnavailable(
            f"llama-cpp-python {version} lacks {', '.join(missing)} of the llama.cpp C API this backend "
            f"calls (an older or different ABI); pip install -U llama-cpp-python"
        )
    return llama_cpp, capi


def _option_error(key: str, value: Any, expected: str) -> SpecError:
    return SpecError(f"llamacpp backend option {key}={value!r}, but should be {expected} "
                     f"(accepted keys: {', '.join(OPTIONS)})")


def _cache_type(key: str, value: Any) -> str:
    """A llama.cpp cache type name from its own name or the contract's dtype name."""
    name = _BY_DTYPE.get(value, value)
    if name not in CACHE_TYPES and value in KV_DTYPES:  # a contract dtype llama.cpp's binding cannot give
        raise NotSupported(f"the llamacpp backend holds {', '.join(_BY_DTYPE)} caches, not {value}")
    if name not in CACHE_TYPES:
        raise _option_error(key, value, f"one of {', '.join(CACHE_TYPES)} "
                                        f"(or {', '.join(_BY_DTYPE)})")
    return name


def _positive(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _option_error(key, value, "a positive integer")
    return value


def _settings(options: Dict[str, Any]) -> Dict[str, Any]:
    """Checked options: every key of OPTIONS, with K/V types resolved from kv_type."""
    unknown = [key for key in options if key not in OPTIONS and key != "kv_dtype"]
    if unknown:
        raise SpecError(f"llamacpp backend option {unknown[0]!r} is unknown (accepted keys: {', '.join(OPTIONS)})")
    out = dict(options)
    if "kv_dtype" in out:  # the contract's name for kv_type
        out["kv_type"] = out.pop("kv_dtype")
    kv = _cache_type("kv_type", out["kv_type"])
    out["type_k"] = _cache_type("type_k", out["type_k"]) if out.get("type_k") is not None else kv
    out["type_v"] = _cache_type("type_v", out["type_v"]) if out.get("type_v") is not None else kv
    out["kv_type"] = kv
    if out["type_k"] != out["type_v"]:
        raise SpecError(
            f"llamacpp backend: type_k={out['type_k']} and type_v={out['type_v']} differ, but the contract's "
            f"CacheSpec has one kv_dtype; give kv_type= for both"
        )
    flash = out.get("flash_attn")
    if flash is not None and not isinstance(flash, bool):
        if flash != "auto":
            raise _option_error("flash_attn", flash, "true, false or auto")
        out["flash_attn"] = None
    if out["type_v"] in QUANTIZED and out.get("flash_attn") is False:
        raise SpecError(f"llamacpp backend: a {out['type_v']} V cache needs flash attention, "
                        f"but flash_attn=false (llama.cpp refuses a quantized V cache without it)")
    for key in ("n_batch", "n_ubatch"):
        _positive(key, out[key])
    if out.get("n_threads") is not None:
        _positive("n_threads", out["n_threads"])
    if not isinstance(out.get("verbose"), bool):
        raise _option_error("verbose", out.get("verbose"), "true or false")
    return out


class LlamaCppBackend:
    """The "llamacpp" backend. Options (``--longctx-backend=llamacpp[kv_type=q8_0,...]``; each can
    also be given to ``open_runtime``): kv_type (KV cache type for K and V: f16 (default), f32,
    q8_0, q4_0, or the contract's names float16, ...), type_k / type_v (each alone; must agree),
    flash_attn (true, false, or auto: llama.cpp decides, the default), n_threads (default: the CPUs
    this process may use), n_batch (tokens per llama_decode call, default 512), n_ubatch (tokens per
    compute step inside a call, default 512), verbose (print llama.cpp's log, default false)."""

    name = "llamacpp"

    def __init__(self, *, kv_type: str = "f16", type_k: Optional[str] = None, type_v: Optional[str] = None,
                 flash_attn: Any = None, n_threads: Optional[int] = None, n_batch: int = 512,
                 n_ubatch: int = 512, verbose: bool = False) -> None:
        self._given = dict(kv_type=kv_type, type_k=type_k, type_v=type_v, flash_attn=flash_attn,
                           n_threads=n_threads, n_batch=n_batch, n_ubatch=n_ubatch, verbose=verbose)
        self.options = _settings(self._given)
        self._package, self._llama = _import_llama()
        _LOG.install(self._llama, verbose)
        self._llama.llama_backend_init()

    def info(self) -> BackendInfo:
        versions = {"llama-cpp-python": getattr(self._package, "__version__", "unknown")}
        versions.update(_ggml_versions(self._llama))
        versions["kv_type"] = self.options["kv_type"]
        versions["flash_attn"] = {None: "auto", True: "on", False: "off"}[self.options["flash_attn"]]
        return BackendInfo(
            name=self.name,
            device_kind="cpu",
            device_name=cpu_name(),
            vendor="",
            versions=versions,
            kv_dtypes=self.kv_dtypes(),
            max_positions=None,
        )

    def kv_dtypes(self) -> Tuple[str, ...]:
        """The contract's dtypes of the cache types this backend opens (quantized ones need flash attention)."""
        names = [n for n in CACHE_TYPES if self.options["flash_attn"] is not False or n not in QUANTIZED]
        return tuple(CACHE_TYPES[n][1] for n in names)

    def open_runtime(self, model: str, context: Optional[int] = None, **options: Any) -> "LlamaCppRuntime":
        """Load ``model`` (a GGUF path) with ``context`` positions (None: the model's training context)."""
        given = {**self._given, **options}
        if ("kv_type" in options or "kv_dtype" in options) and not {"type_k", "type_v"} & set(options):
            given["type_k"] = given["type_v"] = None  # a per-run kv_type is for both K and V
        settings = _settings(given)
        _LOG.verbose = settings["verbose"]
        if context is not None and (not isinstance(context, int) or isinstance(context, bool) or context < 1):
            raise SpecError(f"context={context!r}, but should be a positive integer")
        return LlamaCppRuntime(self._llama, os.fspath(model), context, settings)


def _check_model_file(path: str) -> None:
    """A missing or non-GGUF file, named, before llama.cpp's own less telling failure."""
    if not os.path.exists(path):
        raise SpecError(f"model {path!r} does not exist")
    if not os.path.isfile(path):
        raise SpecError(f"model {path!r} is not a file")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise SpecError(f"model {path!r} cannot be read: {exc.strerror or exc}") from None
    if magic != b"GGUF":
        raise SpecError(f"model {path!r} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")


class LlamaCppRuntime(RuntimeBase):
    """One GGUF model and one llama.cpp context (a single sequence, id 0)."""

    def __init__(self, llama: Any, path: str, context: Optional[int], settings: Dict[str, Any]) -> None:
        self._llama = llama
        self.model_path = path
        self.settings = settings
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        self._logits: Optional[np.ndarray] = None
        self._times = {"prefill_seconds": 0.0, "prefill_tokens": 0, "generate_seconds": 0.0, "generate_tokens": 0}
        _check_model_file(path)
        try:
            self._load_model()
            self.model_context_limit = self._model_limit()
            self.vocab_size = int(llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self._model)))
            self._open_context(context)
            self.kv_spec = self._spec()
        except BaseException:
            self.close()
            raise
        self._memory = llama.llama_get_memory(self._ctx)

    # --- opening ---

    def _load_model(self) -> None:
        llama = self._llama
        params = llama.llama_model_default_params()
        params.n_gpu_layers = 0  # the CPU backend this binding claims, even from a GPU build of llama.cpp
        _LOG.clear()
        self._model = llama.llama_model_load_from_file(self.model_path.encode("utf-8"), params)
        if not self._model:
            self._model = None
            raise SpecError(f"model {self.model_path!r}: llama.cpp could not load it ({_LOG.tail()})")

    def _meta(self, key: str) -> Optional[str]:
        buffer = ctypes.create_string_buffer(256)
        size = self._llama.llama_model_meta_val_str(self._model, key.encode("utf-8"), buffer, len(buffer))
        return buffer.value.decode("utf-8", errors="replace") if size >= 0 else None

    def _meta_number(self, key: str) -> Optional[float]:
        value = self._meta(key)
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    def _arch_number(self, key: str) -> Optional[float]:
        return self._meta_number(f"{self.architecture}.{key}")

    @property
    def architecture(self) -> str:
        return self._meta("general.architecture") or "unknown"

    def _model_limit(self) -> Optional[int]:
        value = self._arch_number("context_length")
        return int(value) if value else None

    def _open_context(self, context: Optional[int]) -> None:
        limit = self.model_context_limit
        requested = context if context is not None else limit
        if requested is None:
            raise SpecError(f"model {self.model_path!r} does not state its context "
                            f"({self.architecture}.context_length); give a context")
        wanted = requested
        if limit is not None and requested > limit:
            wanted = limit
        self._create_context(wanted)
        n_ctx = int(self._llama.llama_n_ctx(self._ctx))
        if limit is not None and n_ctx > limit:  # llama.cpp padded past the training context
            wanted = (limit // N_CTX_PAD) * N_CTX_PAD
            if wanted < 1:
                raise SpecError(f"model {self.model_path!r} holds {limit} positions, fewer than llama.cpp's "
                                f"smallest context of {N_CTX_PAD}")
            self._llama.llama_free(self._ctx)
            self._ctx = None
            self._create_context(wanted)
            n_ctx = int(self._llama.llama_n_ctx(self._ctx))
            if n_ctx > limit:
                raise SpecError(f"llama.cpp opened {n_ctx} positions for a requested {wanted}, above the model's "
                                f"{limit}")
        self.context_limit = n_ctx
        if requested is not None and limit is not None and requested > n_ctx:
            detail = (f"the model's training context is {limit}, and llama.cpp rounds its context up to a "
                      f"multiple of {N_CTX_PAD}, so {limit} cannot be held exactly" if n_ctx < limit
                      else "llama.cpp would run past the training context")
            warnings.warn(ContextClamped(requested, n_ctx, detail=detail), stacklevel=4)

    def _create_context(self, n_ctx: int) -> None:
        llama, s = self._llama, self.settings
        params = llama.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = s["n_batch"]
        params.n_ubatch = min(s["n_ubatch"], s["n_batch"])
        params.n_seq_max = 1
        threads = s["n_threads"] or available_cores()
        params.n_threads = threads
        params.n_threads_batch = threads
        params.type_k = getattr(llama, CACHE_TYPES[s["type_k"]][0])
        params.type_v = getattr(llama, CACHE_TYPES[s["type_v"]][0])
        if hasattr(params, "flash_attn_type"):
            params.flash_attn_type = {None: llama.LLAMA_FLASH_ATTN_TYPE_AUTO, True: llama.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                      False: llama.LLAMA_FLASH_ATTN_TYPE_DISABLED}[s["flash_attn"]]
        elif s["flash_attn"] is not None:
            params.flash_attn = s["flash_attn"]
        params.no_perf = False
        _LOG.clear()
        self._ctx = llama.llama_init_from_model(self._model, params)
        if not self._ctx:
            self._ctx = None
            raise NotSupported(f"llama.cpp could not create a context of {n_ctx} positions with K/V "
                               f"{s['type_k']}/{s['type_v']} for {self.model_path!r} ({_LOG.tail()})")
        self._batch = llama.llama_batch_init(params.n_batch, 0, 1)
        count = params.n_batch
        for i in range(count):  # every token belongs to the single sequence 0
            self._batch.n_seq_id[i] = 1
            self._batch.seq_id[i][0] = 0
        self._n_batch = count
        self._tokens = np.ctypeslib.as_array(self._batch.token, shape=(count,))
        self._pos = np.ctypeslib.as_array(self._batch.pos, shape=(count,))
        self._want = np.ctypeslib.as_array(self._batch.logits, shape=(count,))

    def _spec(self) -> CacheSpec:
        llama = self._llama
        n_layers = int(self._arch_number("block_count") or 0)
        n_heads = int(self._arch_number("attention.head_count") or 0)
        n_kv = int(self._arch_number("attention.head_count_kv") or n_heads)
        width = int(self._arch_number("embedding_length") or 0)
        key = self._arch_number("attention.key_length")
        value = self._arch_number("attention.value_length")
        if not (n_layers and n_heads and width):
            raise NotSupported(f"model {self.model_path!r} ({self.architecture}) does not state block_count, "
                               f"attention.head_count and embedding_length as scalars (per-layer head counts?)")
        head_dim = int(key) if key else width // n_heads
        if value and int(value) != head_dim:
            raise NotSupported(f"model {self.model_path!r}: K heads of {head_dim} and V heads of {int(value)}; "
                               f"the contract's CacheSpec has one head_dim")
        rope_type = int(llama.llama_model_rope_type(self._model))
        theta = self._arch_number("rope.freq_base") or 10000.0
        rotary = self._arch_number("rope.dimension_count")
        rope_args: Dict[str, Any] = {"theta": theta}
        if rope_type == getattr(llama, "LLAMA_ROPE_TYPE_NONE", -1):
            rope_args = {"kind": "none"}
        else:
            rope_args["style"] = "gptj" if rope_type == llama.LLAMA_ROPE_TYPE_NORM else "neox"
            if rotary and int(rotary) < head_dim:
                rope_args["rotary_dim"] = int(rotary)
            scaling = self._meta(f"{self.architecture}.rope.scaling.type")
            factor = self._arch_number("rope.scaling.factor")
            original = self._arch_number("rope.scaling.original_context_length")
            if scaling == "linear" and factor:
                rope_args.update(kind="linear", factor=factor)
            elif scaling == "yarn" and factor and original:
                rope_args.update(kind="yarn", factor=factor, original_max_positions=int(original))
        window = self._arch_number("attention.sliding_window")
        return CacheSpec(
            n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
            max_positions=self.context_limit, kv_dtype=CACHE_TYPES[self.settings["type_k"]][1],
            rope=RopeSpec(**rope_args), sliding_window=int(window) if window else None,
        )

    # --- the contract ---

    def positions(self) -> int:
        """llama.cpp's own count: the largest position of sequence 0 plus one."""
        self._check_open()
        return int(self._llama.llama_memory_seq_pos_max(self._memory, 0)) + 1

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = self._ids(token_ids)
        n = len(ids)
        before = self.positions()
        start_time = time.perf_counter()
        position = before
        try:
            for start in range(0, n, self._n_batch):
                chunk = ids[start:start + self._n_batch]
                rc = self._decode(chunk, position)
                if rc != 0:
                    raise self._failure("prefill", rc, before, n, start, len(chunk), position)
                position += len(chunk)
                # Each batch's last logits are kept, so that after a half-applied prompt they
                # still belong to the last position the context holds.
                logits = self._read_logits()
        finally:
            applied = self.positions() - before
            self._times["prefill_seconds"] += time.perf_counter() - start_time
            self._times["prefill_tokens"] += max(applied, 0)
        return logits.copy()

    def generate(self, n: int) -> List[int]:
        self._check_generate(n)
        before = self.positions()
        out: List[int] = []
        start_time = time.perf_counter()
        try:
            for i in range(n):
                token = int(np.argmax(self._logits))
                rc = self._decode(np.array([token], dtype=np.int32), before + i)
                if rc != 0:
                    raise self._failure("generate", rc, before, n, i, 1, before + i)
                out.append(token)
                self._read_logits()
        finally:
            self._times["generate_seconds"] += time.perf_counter() - start_time
            self._times["generate_tokens"] += max(self.positions() - before, 0)
        return out

    def reset(self) -> None:
        """Clear llama.cpp's memory (the KV cache and its metadata); the model stays loaded."""
        self._check_open()
        self._llama.llama_memory_clear(self._memory, True)
        self._logits = None

    def stats(self) -> RuntimeStats:
        return RuntimeStats(**self._times)

    def perf(self) -> Dict[str, float]:
        """llama.cpp's own counters (llama_perf_context) since the context was created."""
        self._check_open()
        data = self._llama.llama_perf_context(self._ctx)
        return {name: getattr(data, name) for name, _ in data._fields_}

    def close(self) -> None:
        llama = self._llama
        if self._batch is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            llama.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # --- llama.cpp calls ---

    def _is_open(self) -> bool:
        return self._ctx is not None

    def _ids(self, token_ids: Sequence[int]) -> np.ndarray:
        self._check_open()
        return C.token_ids(token_ids, None, np.int32)  # llama_decode itself refuses an id past the vocabulary

    def _decode(self, chunk: np.ndarray, position: int) -> int:
        """One llama_decode of ``chunk`` at ``position``, with the logits of its last token."""
        n = len(chunk)
        batch = self._batch
        batch.n_tokens = n
        self._tokens[:n] = chunk
        self._pos[:n] = np.arange(position, position + n, dtype=np.int32)
        self._want[:n] = 0
        self._want[n - 1] = 1
        _LOG.clear()
        return int(self._llama.llama_decode(self._ctx, batch))

    def _read_logits(self) -> np.ndarray:
        pointer = self._llama.llama_get_logits_ith(self._ctx, -1)
        if not pointer:
            raise RuntimeFailure(f"llama_get_logits_ith(-1) returned NULL after a decode of {self.model_path!r} "
                                 f"({_LOG.tail()})")
        self._logits = np.ctypeslib.as_array(pointer, shape=(self.vocab_size,)).astype(np.float32, copy=True)
        return self._logits

    def _failure(self, call: str, rc: int, before: int, n: int, start: int, size: int, kept: int) -> Exception:
        """The error for a non-zero llama_decode; ``kept`` is where the last successful batch ended."""
        now = self.positions()
        applied = now - before
        if now != kept:  # llama.cpp kept part of the failed batch (an abort or fatal error): no logits for it
            self._logits = None
        meaning = DECODE_CODES.get(rc, "fatal error" if rc < -1 else "unknown code")
        said = _LOG.tail()
        what = "prompt" if call == "prefill" else "generation"
        if rc == 1 and before + n > self.context_limit:
            return ContextLimitExceeded(
                None, before, n, self.context_limit,
                detail=(f"llama.cpp applied {applied} of {n} tokens before refusing: llama_decode returned 1 "
                        f"({meaning}) for tokens {start}..{start + size - 1} of the {what}; llama.cpp said: {said}"),
            )
        return RuntimeFailure(
            f"llama_decode returned {rc} ({meaning}) in {call} for tokens {start}..{start + size - 1} of a "
            f"{n}-token {what} at position {before + start} of {self.model_path!r}; the context holds {now} "
            f"positions now ({applied:+d}); llama.cpp said: {said}"
        )


def _ggml_versions(llama: Any) -> Dict[str, str]:
    """ggml's version and commit, where the loaded library exports them."""
    out: Dict[str, str] = {}
    lib = getattr(llama, "_lib", None)
    for key, symbol in (("ggml", "ggml_version"), ("ggml commit", "ggml_commit")):
        with contextlib.suppress(Exception):
            function = getattr(lib, symbol)
            function.restype = ctypes.c_char_p
            function.argtypes = []
            value = function()
            if value:
                out[key] = value.decode("utf-8", errors="replace")
    with contextlib.suppress(Exception):
        out["llama.cpp system"] = llama.llama_print_system_info().decode("utf-8", errors="replace").strip()
    return out
