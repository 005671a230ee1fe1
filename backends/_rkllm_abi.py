"""The RKLLM runtime's C ABI (librkllmrt.so 1.2.1 to 1.2.x) in ctypes, and the check that a
library is of that ABI before any struct crosses to it.

Layouts follow the public ``rkllm.h`` of 1.2.1/1.2.2 field by field; the sizes are those of
``../shared/notes/rkllm-abi.md`` (LP64: extend param 120 bytes, RKLLMParam 208 with
extend_param at 88, RKLLMInput 64, RKLLMInferParam 32, RKLLMResult 72 with perf at 48), and
the tests check them against ctypes and against a C compiler's layout of the same structs.

Which version a library is, and the evidence:

- 1.2.0 has no ``rkllm_get_kv_cache_size`` (and a void callback, no perf in the result):
  refused when that symbol is missing.
- 1.3.0 exports the same names as 1.2.x, but RKLLMParam lost img_start/img_end/img_content
  and gained ignore_eos_token (184 bytes), RKLLMInferParam gained a sampling-params pointer
  and max_new_tokens, and ``rkllm_init`` takes a struct of callbacks instead of a function:
  a 1.2 binding's first ``rkllm_init`` on it corrupts memory. The symbols cannot tell 1.2
  from 1.3; the version the runtime names can. It prints
  ``I rkllm: rkllm-runtime version: 1.2.1, rknpu driver version: 0.9.7, platform: RK3588``
  at ``rkllm_init`` (users' logs), so the library *file* is searched for
  ``rkllm-runtime version: X.Y.Z`` before it is even loaded. A binary that keeps the number
  apart from that text (printed through ``%s``) gives nothing to find: it is refused unless
  the user states the version it prints (option ``runtime_version=``), and the runtime's own
  line, captured at ``rkllm_init``, must then agree.

Only 1.2.1 and later 1.2.x are accepted. The refusal is ``BackendUnavailable``: which
runtime is installed is a fact of the machine, like its absence, so every case is skipped
with the one-line reason (and a certificate with skipped cases is never "certified").
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

from pytest_longctx.errors import BackendUnavailable

ENV_LIBRARY = "LONGCTX_RKLLM_LIBRARY"
DEFAULT_LIBRARY = "/usr/lib/librkllmrt.so"

# LLMCallState
RUN_NORMAL, RUN_WAITING, RUN_FINISH, RUN_ERROR = 0, 1, 2, 3
STATE_NAMES = {0: "RKLLM_RUN_NORMAL", 1: "RKLLM_RUN_WAITING", 2: "RKLLM_RUN_FINISH", 3: "RKLLM_RUN_ERROR"}
# RKLLMInputType
INPUT_PROMPT, INPUT_TOKEN, INPUT_EMBED, INPUT_MULTIMODAL = 0, 1, 2, 3
# RKLLMInferMode
INFER_GENERATE, INFER_GET_LAST_HIDDEN_LAYER, INFER_GET_LOGITS = 0, 1, 2
MODE_NAMES = {0: "RKLLM_INFER_GENERATE", 1: "RKLLM_INFER_GET_LAST_HIDDEN_LAYER", 2: "RKLLM_INFER_GET_LOGITS"}


class RKLLMExtendParam(ctypes.Structure):
    _fields_ = [
        ("base_domain_id", ctypes.c_int32),
        ("embed_flash", ctypes.c_int8),
        ("enabled_cpus_num", ctypes.c_int8),
        ("enabled_cpus_mask", ctypes.c_uint32),
        ("n_batch", ctypes.c_uint8),
        ("use_cross_attn", ctypes.c_int8),
        ("reserved", ctypes.c_uint8 * 104),
    ]


class RKLLMParam(ctypes.Structure):
    _fields_ = [
        ("model_path", ctypes.c_char_p),
        ("max_context_len", ctypes.c_int32),
        ("max_new_tokens", ctypes.c_int32),
        ("top_k", ctypes.c_int32),
        ("n_keep", ctypes.c_int32),
        ("top_p", ctypes.c_float),
        ("temperature", ctypes.c_float),
        ("repeat_penalty", ctypes.c_float),
        ("frequency_penalty", ctypes.c_float),
        ("presence_penalty", ctypes.c_float),
        ("mirostat", ctypes.c_int32),
        ("mirostat_tau", ctypes.c_float),
        ("mirostat_eta", ctypes.c_float),
        ("skip_special_token", ctypes.c_bool),
        ("is_async", ctypes.c_bool),
        ("img_start", ctypes.c_char_p),
        ("img_end", ctypes.c_char_p),
        ("img_content", ctypes.c_char_p),
        ("extend_param", RKLLMExtendParam),
    ]


class RKLLMEmbedInput(ctypes.Structure):
    _fields_ = [("embed", ctypes.POINTER(ctypes.c_float)), ("n_tokens", ctypes.c_size_t)]


class RKLLMTokenInput(ctypes.Structure):
    _fields_ = [("input_ids", ctypes.POINTER(ctypes.c_int32)), ("n_tokens", ctypes.c_size_t)]


class RKLLMMultiModelInput(ctypes.Structure):
    _fields_ = [
        ("prompt", ctypes.c_char_p),
        ("image_embed", ctypes.POINTER(ctypes.c_float)),
        ("n_image_tokens", ctypes.c_size_t),
        ("n_image", ctypes.c_size_t),
        ("image_width", ctypes.c_size_t),
        ("image_height", ctypes.c_size_t),
    ]


class _RKLLMInputUnion(ctypes.Union):
    _fields_ = [
        ("prompt_input", ctypes.c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModelInput),
    ]


class RKLLMInput(ctypes.Structure):
    _anonymous_ = ("_u",)
    _fields_ = [
        ("role", ctypes.c_char_p),
        ("enable_thinking", ctypes.c_bool),
        ("input_type", ctypes.c_int),
        ("_u", _RKLLMInputUnion),
    ]


class RKLLMLoraParam(ctypes.Structure):
    _fields_ = [("lora_adapter_name", ctypes.c_char_p)]


class RKLLMPromptCacheParam(ctypes.Structure):
    _fields_ = [("save_prompt_cache", ctypes.c_int), ("prompt_cache_path", ctypes.c_char_p)]


class RKLLMInferParam(ctypes.Structure):
    _fields_ = [
        ("mode", ctypes.c_int),
        ("lora_params", ctypes.POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", ctypes.POINTER(RKLLMPromptCacheParam)),
        ("keep_history", ctypes.c_int),
    ]


class RKLLMResultLastHiddenLayer(ctypes.Structure):
    _fields_ = [("hidden_states", ctypes.POINTER(ctypes.c_float)), ("embd_size", ctypes.c_int),
                ("num_tokens", ctypes.c_int)]


class RKLLMResultLogits(ctypes.Structure):
    _fields_ = [("logits", ctypes.POINTER(ctypes.c_float)), ("vocab_size", ctypes.c_int),
                ("num_tokens", ctypes.c_int)]


class RKLLMPerfStat(ctypes.Structure):
    _fields_ = [
        ("prefill_time_ms", ctypes.c_float),
        ("prefill_tokens", ctypes.c_int),
        ("generate_time_ms", ctypes.c_float),
        ("generate_tokens", ctypes.c_int),
        ("memory_usage_mb", ctypes.c_float),
    ]


class RKLLMResult(ctypes.Structure):
    _fields_ = [
        ("text", ctypes.c_char_p),
        ("token_id", ctypes.c_int32),
        ("last_hidden_layer", RKLLMResultLastHiddenLayer),
        ("logits", RKLLMResultLogits),
        ("perf", RKLLMPerfStat),
    ]


# int (*)(RKLLMResult*, void* userdata, LLMCallState): 0 continues, 1 pauses the run.
LLMResultCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(RKLLMResult), ctypes.c_void_p, ctypes.c_int)
LLMHandle = ctypes.c_void_p

# The facts of ../shared/notes/rkllm-abi.md, checked by the tests against these classes.
LAYOUT = {
    "sizeof(RKLLMExtendParam)": 120,
    "sizeof(RKLLMParam)": 208,
    "offsetof(RKLLMParam, extend_param)": 88,
    "sizeof(RKLLMInput)": 64,
    "sizeof(RKLLMInferParam)": 32,
    "sizeof(RKLLMResult)": 72,
    "offsetof(RKLLMResult, perf)": 48,
}

REQUIRED = ("rkllm_createDefaultParam", "rkllm_init", "rkllm_run", "rkllm_destroy", "rkllm_clear_kv_cache",
            "rkllm_get_kv_cache_size", "rkllm_set_chat_template")
_VERSION_TEXT = re.compile(rb"rkllm-runtime version:? *v?(\d+)\.(\d+)\.(\d+)([^\x00\r\n]{0,100})")
_LOG_VERSION = re.compile(r"rkllm-runtime version:? *v?(\d+\.\d+\.\d+)")
_STATED = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)\S*$")


@dataclass(frozen=True)
class Library:
    """A loaded librkllmrt.so that passed the ABI check."""

    lib: ctypes.CDLL
    path: str
    version: str  # "1.2.1"
    evidence: str  # how the version is known, one line
    banner: str = ""  # the text found beside the version in the binary, if any


def find_library(option: Optional[str]) -> Tuple[str, str]:
    """(path, where it came from): the ``library`` option, then $LONGCTX_RKLLM_LIBRARY, then
    /usr/lib/librkllmrt.so. The first place that is given decides (no falling through to
    another library than the one asked for); a path that is not there is BackendUnavailable
    naming every place looked."""
    env = os.environ.get(ENV_LIBRARY, "").strip()
    looked = [
        f"option library={option}" if option else "option library= (not given)",
        f"${ENV_LIBRARY}={env}" if env else f"${ENV_LIBRARY} (not set)",
        DEFAULT_LIBRARY,
    ]
    if option:
        path, source = os.fspath(option), "option library="
    elif env:
        path, source = env, f"${ENV_LIBRARY}"
    else:
        path, source = DEFAULT_LIBRARY, "default path"
    if not os.path.isfile(path):
        raise BackendUnavailable(
            f"no RKLLM runtime library at {path} (from the {source}); looked at: {'; '.join(looked)}"
        )
    return path, source


def versions_in_file(path: str) -> List[Tuple[str, str]]:
    """Every distinct ("X.Y.Z", text after it) of "rkllm-runtime version: X.Y.Z" in the file."""
    found: List[Tuple[str, str]] = []
    overlap = 256
    tail = b""
    with open(path, "rb") as handle:
        while True:
            block = handle.read(1 << 22)
            if not block:
                break
            data = tail + block
            for match in _VERSION_TEXT.finditer(data):
                version = b".".join(match.group(1, 2, 3)).decode()
                banner = match.group(0).decode("ascii", "replace").strip()
                if (version, banner) not in found:
                    found.append((version, banner))
            tail = data[-overlap:]
    return found


def _accepted(version: str) -> bool:
    major, minor, patch = (int(x) for x in version.split(".")[:3])
    return (major, minor) == (1, 2) and patch >= 1


def _refusal(path: str, version: str, evidence: str) -> BackendUnavailable:
    major, minor, patch = (int(x) for x in version.split(".")[:3])
    if (major, minor) >= (1, 3):
        why = ("1.3 changed RKLLMParam, RKLLMInferParam and rkllm_init's callback argument; this binding "
               "speaks the 1.2.1-1.2.x ABI and would corrupt memory")
    elif (major, minor, patch) == (1, 2, 0):
        why = "1.2.0 has no rkllm_get_kv_cache_size, no perf statistics and a void callback"
    else:
        why = "this binding speaks the 1.2.1-1.2.x ABI only"
    return BackendUnavailable(f"{path} is RKLLM runtime {version} ({evidence}): refused, {why}")


def check_version(path: str, stated: Optional[str] = None) -> Tuple[str, str, str]:
    """(version, evidence, banner) for a library file, or BackendUnavailable; loads nothing."""
    if stated is not None:
        stated = str(stated).strip()
        if not _STATED.match(stated):
            raise BackendUnavailable(f"runtime_version={stated!r} is not a version like 1.2.1")
        stated = ".".join(_STATED.match(stated).group(1, 2, 3))
    try:
        found = versions_in_file(path)
    except OSError as exc:
        raise BackendUnavailable(f"cannot read {path}: {exc.strerror or exc}") from None
    versions = sorted({v for v, _ in found})
    if len(versions) > 1:
        raise BackendUnavailable(f"{path} names several runtime versions ({', '.join(versions)}): refused")
    if versions:
        version, banner = versions[0], found[0][1]
        if stated is not None and stated != version:
            raise BackendUnavailable(
                f"runtime_version={stated} was given, but {path} says \"{banner}\": refused")
        evidence = f'"{banner}" in the binary'
    elif stated is not None:
        version, banner = stated, ""
        evidence = "stated by runtime_version=; no version text in the binary"
    else:
        raise BackendUnavailable(
            f"{path}: no \"rkllm-runtime version: X.Y.Z\" text in the binary, and 1.2 and 1.3 export the same "
            "symbols, so its ABI is unknown: refused rather than risk memory corruption; if it is 1.2.1-1.2.x, "
            "give runtime_version= with the version its rkllm_init prints")
    if not _accepted(version):
        raise _refusal(path, version, evidence)
    return version, evidence, banner


def open_library(path: str, stated: Optional[str] = None) -> Library:
    """Check the version in the file, load it, check its symbols and declare the functions."""
    version, evidence, banner = check_version(path, stated)
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise BackendUnavailable(f"cannot load {path}: {exc}") from None
    missing = [name for name in REQUIRED if not hasattr(lib, name)]
    if "rkllm_get_kv_cache_size" in missing:
        raise BackendUnavailable(
            f"{path} has no rkllm_get_kv_cache_size, so it is RKLLM 1.2.0 or older whatever it says ({evidence}): "
            "refused, this binding speaks the 1.2.1-1.2.x ABI")
    if missing:
        raise BackendUnavailable(f"{path} is not an RKLLM runtime: it lacks {', '.join(missing)}")
    _declare(lib)
    return Library(lib, path, version, evidence, banner)


def _declare(lib: ctypes.CDLL) -> None:
    i, handle = ctypes.c_int, LLMHandle
    lib.rkllm_createDefaultParam.argtypes, lib.rkllm_createDefaultParam.restype = [], RKLLMParam
    lib.rkllm_init.argtypes = [ctypes.POINTER(handle), ctypes.POINTER(RKLLMParam), LLMResultCallback]
    lib.rkllm_run.argtypes = [handle, ctypes.POINTER(RKLLMInput), ctypes.POINTER(RKLLMInferParam), ctypes.c_void_p]
    lib.rkllm_destroy.argtypes = [handle]
    lib.rkllm_clear_kv_cache.argtypes = [handle, i, ctypes.POINTER(i), ctypes.POINTER(i)]
    lib.rkllm_get_kv_cache_size.argtypes = [handle, ctypes.POINTER(i)]
    lib.rkllm_set_chat_template.argtypes = [handle, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p]
    for name in ("rkllm_init", "rkllm_run", "rkllm_destroy", "rkllm_clear_kv_cache", "rkllm_get_kv_cache_size",
                 "rkllm_set_chat_template"):
        getattr(lib, name).restype = i


def version_in_log(text: str) -> Optional[str]:
    """The version the runtime printed at rkllm_init, if it did."""
    match = _LOG_VERSION.search(text)
    return match.group(1) if match else None


# --- what the runtime prints -------------------------------------------------------------------


class OutputCapture:
    """Captures what native code writes to file descriptors 1 and 2 during a call.

    The runtime reports why it failed only in its log ("E rkllm: max_context[16384] must be
    less than the model's max_context_limit[4096]"), so the binding reads it to name the
    reason; the text is written back to the same descriptor afterwards, so nothing is lost.
    """

    def __init__(self) -> None:
        self._files = []
        try:
            self._files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
            self._flush = ctypes.CDLL(None).fflush
            self._flush.argtypes, self._flush.restype = [ctypes.c_void_p], ctypes.c_int
        except (OSError, AttributeError):  # no temp dir or no libc symbol: run uncaptured
            self._files = []

    @contextlib.contextmanager
    def __call__(self) -> Iterator[List[str]]:
        text: List[str] = []
        if not self._files:
            yield text
            return
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        saved = []
        try:
            for fd, spool in zip((1, 2), self._files):
                spool.seek(0)
                spool.truncate()
                saved.append((fd, os.dup(fd), spool))
                os.dup2(spool.fileno(), fd)
        except OSError:  # a closed descriptor: put back what was moved and run uncaptured
            for fd, copy, _ in saved:
                os.dup2(copy, fd)
                os.close(copy)
            yield text
            return
        try:
            yield text
        finally:
            self._flush(None)
            for fd, copy, spool in saved:
                os.dup2(copy, fd)
                os.close(copy)
                spool.seek(0)
                data = spool.read()
                if data:
                    with contextlib.suppress(OSError):
                        os.write(fd, data)
                    text.append(data.decode("utf-8", "replace"))

    def close(self) -> None:
        for spool in self._files:
            spool.close()
        self._files = []


def said(text: str, limit: int = 2) -> str:
    """The runtime's error lines (or its last lines) as one quoted phrase, "" if it said nothing."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E ") or "error" in line.lower()]
    chosen = (errors or lines)[-limit:]
    return "; ".join(f'"{line}"' for line in chosen)
