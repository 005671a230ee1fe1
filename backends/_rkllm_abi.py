"""The RKLLM runtime's C ABI (librkllmrt.so 1.2.1 to 1.2.x, and 1.3.x) in ctypes, and the check
that decides which ABI a library speaks before any struct crosses to it.

Layouts follow the public ``rkllm.h`` of each release field by field (airockchip/rknn-llm,
``rkllm-runtime/Linux/librkllm_api/include/rkllm.h`` at v1.2.1 and at v1.3.0; v1.2.2 and
v1.2.3 have the 1.2.1 layouts). The tests pin every size and offset worked out from those
field lists and compare them with ctypes and with a C compiler's layout of the same structs.

1.3.0 exports the same names as 1.2.x but is another ABI: RKLLMParam lost
img_start/img_end/img_content and gained ignore_eos_token (184 bytes, not 208),
RKLLMInput's multimodal member grew image and video parts (160 bytes, not 64),
RKLLMInferParam gained a sampling-params pointer and max_new_tokens (40 bytes, not 32), and
``rkllm_init`` takes a pointer to an RKLLMCallback struct instead of a function. A binding of
one ABI on the other corrupts memory at its first ``rkllm_init`` (rknn-llm #509).

Which version a library is, and the evidence:

- The symbols cannot tell 1.2 from 1.3; the version the runtime names can. It prints
  ``I rkllm: rkllm-runtime version: 1.2.1, rknpu driver version: 0.9.7, platform: RK3588``
  at ``rkllm_init`` (users' logs), so the library *file* is searched for
  ``rkllm-runtime version: X.Y.Z`` before it is even loaded, and that version alone picks
  the ABI. A binary that keeps the number apart from that text (printed through ``%s``)
  gives nothing to find: it is refused unless the user states the version it prints (option
  ``runtime_version=``), and the runtime's own line, captured at ``rkllm_init``, must then
  agree (a wrong statement is caught only after that first call: the documented risk).
- 1.2.0 has no ``rkllm_get_kv_cache_size`` (and a void callback, no perf in the result):
  refused when that symbol is missing, whatever the text says.

Any other version is refused. The refusal is ``BackendUnavailable``: which runtime is
installed is a fact of the machine, like its absence, so every case is skipped with the
one-line reason (and a certificate with skipped cases is never "certified").
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


# RKLLMParam up to skip_special_token is the same in both ABIs; 1.3 inserts ignore_eos_token
# after it and drops img_start/img_end/img_content, which moves extend_param from 88 to 60.
_PARAM_HEAD = [
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
]


class RKLLMParam12(ctypes.Structure):
    _fields_ = _PARAM_HEAD + [
        ("is_async", ctypes.c_bool),
        ("img_start", ctypes.c_char_p),
        ("img_end", ctypes.c_char_p),
        ("img_content", ctypes.c_char_p),
        ("extend_param", RKLLMExtendParam),
    ]


class RKLLMParam13(ctypes.Structure):
    _fields_ = _PARAM_HEAD + [
        ("ignore_eos_token", ctypes.c_bool),
        ("is_async", ctypes.c_bool),
        ("extend_param", RKLLMExtendParam),
    ]


class RKLLMEmbedInput(ctypes.Structure):
    _fields_ = [("embed", ctypes.POINTER(ctypes.c_float)), ("n_tokens", ctypes.c_size_t)]


class RKLLMTokenInput(ctypes.Structure):
    _fields_ = [("input_ids", ctypes.POINTER(ctypes.c_int32)), ("n_tokens", ctypes.c_size_t)]


class RKLLMMultiModelInput12(ctypes.Structure):
    _fields_ = [
        ("prompt", ctypes.c_char_p),
        ("image_embed", ctypes.POINTER(ctypes.c_float)),
        ("n_image_tokens", ctypes.c_size_t),
        ("n_image", ctypes.c_size_t),
        ("image_width", ctypes.c_size_t),
        ("image_height", ctypes.c_size_t),
    ]


class RKLLMImageInput13(ctypes.Structure):
    """1.3's ``image`` part of the multimodal input (an unnamed struct in rkllm.h)."""

    _fields_ = [
        ("image_embed", ctypes.POINTER(ctypes.c_float)),
        ("n_image_tokens", ctypes.c_size_t),
        ("n_image", ctypes.c_size_t),
        ("image_start", ctypes.c_char_p),
        ("image_end", ctypes.c_char_p),
        ("image_content", ctypes.c_char_p),
        ("image_width", ctypes.c_size_t),
        ("image_height", ctypes.c_size_t),
    ]


class RKLLMVideoInput13(ctypes.Structure):
    """1.3's ``video`` part of the multimodal input (an unnamed struct in rkllm.h)."""

    _fields_ = [
        ("video_embed", ctypes.POINTER(ctypes.c_float)),
        ("n_frame_tokens", ctypes.c_size_t),
        ("n_frame_per_video", ctypes.c_size_t),
        ("n_video", ctypes.c_size_t),
        ("video_start", ctypes.c_char_p),
        ("video_end", ctypes.c_char_p),
        ("video_content", ctypes.c_char_p),
        ("frame_width", ctypes.c_size_t),
        ("frame_height", ctypes.c_size_t),
    ]


class RKLLMMultiModalInput13(ctypes.Structure):
    _fields_ = [("prompt", ctypes.c_char_p), ("image", RKLLMImageInput13), ("video", RKLLMVideoInput13)]


def _input_struct(name: str, multimodal: type) -> type:
    """RKLLMInput of one ABI: the union's size follows its multimodal member (48 or 144 bytes)."""
    union = type(f"_{name}Union", (ctypes.Union,), {"_fields_": [
        ("prompt_input", ctypes.c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", multimodal),
    ]})
    return type(name, (ctypes.Structure,), {"_anonymous_": ("_u",), "_fields_": [
        ("role", ctypes.c_char_p),
        ("enable_thinking", ctypes.c_bool),
        ("input_type", ctypes.c_int),
        ("_u", union),
    ]})


RKLLMInput12 = _input_struct("RKLLMInput12", RKLLMMultiModelInput12)
RKLLMInput13 = _input_struct("RKLLMInput13", RKLLMMultiModalInput13)


class RKLLMLoraParam(ctypes.Structure):
    _fields_ = [("lora_adapter_name", ctypes.c_char_p)]


class RKLLMPromptCacheParam(ctypes.Structure):
    _fields_ = [("save_prompt_cache", ctypes.c_int), ("prompt_cache_path", ctypes.c_char_p)]


class RKLLMSamplingParam(ctypes.Structure):
    """1.3 only: sampling for one run, overriding RKLLMParam's."""

    _fields_ = [
        ("top_k", ctypes.c_int32),
        ("top_p", ctypes.c_float),
        ("temperature", ctypes.c_float),
        ("repeat_penalty", ctypes.c_float),
        ("frequency_penalty", ctypes.c_float),
        ("presence_penalty", ctypes.c_float),
        ("mirostat", ctypes.c_int32),
        ("mirostat_tau", ctypes.c_float),
        ("mirostat_eta", ctypes.c_float),
    ]


class RKLLMInferParam12(ctypes.Structure):
    _fields_ = [
        ("mode", ctypes.c_int),
        ("lora_params", ctypes.POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", ctypes.POINTER(RKLLMPromptCacheParam)),
        ("keep_history", ctypes.c_int),
    ]


class RKLLMInferParam13(ctypes.Structure):
    _fields_ = [
        ("mode", ctypes.c_int),
        ("lora_params", ctypes.POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", ctypes.POINTER(RKLLMPromptCacheParam)),
        ("sampling_params", ctypes.POINTER(RKLLMSamplingParam)),
        ("keep_history", ctypes.c_int),
        ("max_new_tokens", ctypes.c_int32),  # <= 0: RKLLMParam's
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
    """The same in 1.2.1-1.2.x and 1.3.x."""

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


class RKLLMCallback13(ctypes.Structure):
    """1.3's rkllm_init takes a pointer to this instead of the result callback itself; the
    tokenizer and embedding callbacks are for models without their own (NULL here)."""

    _fields_ = [
        ("result_callback", LLMResultCallback),
        ("result_userdata", ctypes.c_void_p),
        ("tokenizer_callback", ctypes.c_void_p),
        ("tokenizer_userdata", ctypes.c_void_p),
        ("embed_callback", ctypes.c_void_p),
        ("embed_userdata", ctypes.c_void_p),
    ]


@dataclass(frozen=True)
class Abi:
    """The structs of one RKLLM ABI; which one a library gets is decided by its version only."""

    name: str  # "1.2" or "1.3"
    versions: str  # what it covers, for messages
    param: type
    input: type
    infer: type
    callbacks: Optional[type]  # 1.3: the struct rkllm_init takes; 1.2: None (a bare function)
    header: str  # the public rkllm.h the layouts follow

    @property
    def per_run_sampling(self) -> bool:
        return self.callbacks is not None


_HEADER = "airockchip/rknn-llm rkllm-runtime/Linux/librkllm_api/include/rkllm.h"
ABI_1_2 = Abi("1.2", "1.2.1-1.2.x", RKLLMParam12, RKLLMInput12, RKLLMInferParam12, None,
              f"{_HEADER} of release v1.2.1 (d546a0f9; v1.2.2 and v1.2.3 have the same layouts)")
ABI_1_3 = Abi("1.3", "1.3.x", RKLLMParam13, RKLLMInput13, RKLLMInferParam13, RKLLMCallback13,
              f"{_HEADER} of release v1.3.0 (878f9361)")
ABIS = (ABI_1_2, ABI_1_3)
SUPPORTED = "1.2.1-1.2.x or 1.3.x"

def abi_for(version: str) -> Optional[Abi]:
    """The ABI of a runtime version: 1.2.1-1.2.x or 1.3.x; None for any other."""
    major, minor, patch = (int(x) for x in version.split(".")[:3])
    if (major, minor) == (1, 2) and patch >= 1:
        return ABI_1_2
    if (major, minor) == (1, 3):
        return ABI_1_3
    return None


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
    abi: Abi
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
            f"no RKLLM runtime library at {path} (from the {source}; expected librkllmrt.so {SUPPORTED}); "
            f"looked at: {'; '.join(looked)}"
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


def _refusal(path: str, version: str, evidence: str) -> BackendUnavailable:
    major, minor, patch = (int(x) for x in version.split(".")[:3])
    if (major, minor, patch) == (1, 2, 0):
        why = "1.2.0 has no rkllm_get_kv_cache_size, no perf statistics and a void callback"
    else:
        why = "no rkllm.h of that version was checked, and a struct of the wrong layout corrupts memory"
    return BackendUnavailable(f"{path} is RKLLM runtime {version} ({evidence}), expected {SUPPORTED}: refused, {why}")


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
            "symbols, so its ABI is unknown: refused rather than risk memory corruption; if it is "
            f"{SUPPORTED}, give runtime_version= with the version its rkllm_init prints")
    if abi_for(version) is None:
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
            f"refused, expected {SUPPORTED}")
    if missing:
        raise BackendUnavailable(f"{path} is not an RKLLM runtime: it lacks {', '.join(missing)}")
    abi = abi_for(version)
    assert abi is not None  # check_version refused every other version
    _declare(lib, abi)
    return Library(lib, path, version, abi, evidence, banner)


def _declare(lib: ctypes.CDLL, abi: Abi) -> None:
    """Every struct-taking function declared with that ABI's structs: ctypes then refuses a
    struct of the other ABI at the call instead of passing it."""
    i, handle = ctypes.c_int, LLMHandle
    lib.rkllm_createDefaultParam.argtypes, lib.rkllm_createDefaultParam.restype = [], abi.param
    third = ctypes.POINTER(abi.callbacks) if abi.callbacks is not None else LLMResultCallback
    lib.rkllm_init.argtypes = [ctypes.POINTER(handle), ctypes.POINTER(abi.param), third]
    lib.rkllm_run.argtypes = [handle, ctypes.POINTER(abi.input), ctypes.POINTER(abi.infer), ctypes.c_void_p]
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
