"""The "openvino-genai" backend: a GGUF (or an OpenVINO IR folder) run by OpenVINO.

A whole-model runtime (``RuntimeBackend``): the suite sees token ids, logits,
positions and statistics, never the KV cache. ``openvino_genai.LLMPipeline``
converts the GGUF (F16, Q8_0, Q4_0/Q4_1/Q4_K/Q6_K weights; a "gpt2" byte-level
BPE tokenizer; architectures llama, qwen2, qwen3) and saves the converted
stateful IR (``enable_save_ov_model``); ``openvino.Core`` then runs that IR
directly, because the pipeline returns text, not logits. The IR is the
pipeline's own model: a KV cache held as model state (ReadValue/Assign) that
grows with every prompt, ScaledDotProductAttention, logits out.

What it reports and why:

- ``model_context_limit`` is the GGUF's ``<arch>.context_length`` (an IR folder:
  config.json's ``max_position_embeddings``). On NPU the limit in force is also
  bounded by ``max_prompt_len + min_response_len``, the static sizes the NPU
  compiles for (openvino-genai's MAX_PROMPT_LEN / MIN_RESPONSE_LEN).
- A context above the model's is clamped to it with a ``ContextClamped`` warning.
- Prompts are NOT checked against the context: OpenVINO (the IR, and the
  pipeline, which only logs a warning) accepts positions past the model's
  context, and the suite's limits group must see that, not a check this binding
  adds. ``positions()`` is what OpenVINO holds (the binding's count of what it
  applied; after a failed call it is re-read from the model state).
- The inference precision hint and the KV cache precision are set explicitly:
  OpenVINO's CPU defaults are bf16 compute on CPUs with bf16 instructions and a
  u8 KV cache, which would make an f32 logits comparison meaningless. Both are
  read back from the compiled model and recorded in ``info()`` (options
  ``precision`` and ``kv_dtype``: float32 by default).
- The saved IR is the pipeline's model serialized with fp16 compression of its
  constants (``save_openvino_model(..., compress_to_fp16=true)``), the RoPE
  inverse-frequency table included: the angles of position p are off by about
  p x 3e-4 rad, so its logits drift from a float64 forward pass as the prompt
  grows (docs/findings/openvino-genai.md). The binding runs the IR as saved.
- The logits are sliced to the last position inside the model before the LM
  head (as the pipeline does), so a long prompt does not materialize
  (n, vocab) logits.
- There is no prefix cache on this path: the pipeline's (which serves a
  repeated prompt from cache) is not used, so timed prompts are computed.
- ``stats()`` comes from the binding's timers around ``infer``.

openvino and openvino_genai are imported when the backend is constructed:
without them the backend is unavailable, with the install command. A device
that is not present is unavailable, naming the devices that are.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
import warnings
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from pytest_longctx.errors import (
    BackendUnavailable, ContextClamped, NotSupported, RuntimeFailure, SpecError,
)
from pytest_longctx.protocol import BackendInfo, RuntimeStats
from pytest_longctx.spec import CacheSpec, RopeSpec

from . import _checks as C
from ._gguf_meta import FILE_TYPES, GGUFHeaderError, read_header
from ._host import cpu_name_and_vendor, one_line
from ._runtime import RuntimeBase

OPTIONS = ("device", "precision", "kv_dtype", "threads", "cache_dir", "max_prompt_len", "min_response_len")
DEVICES = ("CPU", "GPU", "NPU")
# The contract's dtype -> OpenVINO's element type name, for the precision hint and the KV cache.
PRECISIONS = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
# openvino-genai's NPU defaults (MAX_PROMPT_LEN, MIN_RESPONSE_LEN).
NPU_PROMPT, NPU_RESPONSE = 1024, 128
ARCHITECTURES = ("llama", "qwen2", "qwen3")  # what the pipeline's GGUF reader builds
READABLE = ("F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")  # the weight types it converts
IR_FILE = "openvino_model.xml"
SOURCE_FILE = "longctx-source.json"  # beside a converted IR: the GGUF it came from and its header
INSTALL = "pip install 'pytest-longctx[openvino]'"


def _import_openvino() -> Tuple[Any, Any]:
    try:
        import openvino
    except ImportError as exc:
        raise BackendUnavailable(f"openvino is not installed ({exc}); {INSTALL}") from None
    try:
        import openvino_genai
    except ImportError as exc:
        raise BackendUnavailable(f"openvino_genai is not importable ({one_line(exc)}); {INSTALL}") from None
    return openvino, openvino_genai


def _option_error(key: str, value: Any, expected: str) -> SpecError:
    return SpecError(f"openvino-genai backend option {key}={value!r}, but should be {expected} "
                     f"(accepted keys: {', '.join(OPTIONS)})")


def _positive(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _option_error(key, value, "a positive integer")
    return value


def _settings(options: Dict[str, Any]) -> Dict[str, Any]:
    unknown = [key for key in options if key not in OPTIONS]
    if unknown:
        raise SpecError(f"openvino-genai backend option {unknown[0]!r} is unknown "
                        f"(accepted keys: {', '.join(OPTIONS)})")
    out = dict(options)
    out["device"] = str(out["device"]).upper()
    if out["device"] not in DEVICES:
        raise _option_error("device", options["device"], f"one of {', '.join(DEVICES)}")
    for key in ("precision", "kv_dtype"):
        if out[key] not in PRECISIONS:
            raise _option_error(key, out[key], f"one of {', '.join(PRECISIONS)}")
    for key in ("threads", "max_prompt_len", "min_response_len"):
        if out.get(key) is not None:
            _positive(key, out[key])
    if out.get("cache_dir") is not None and not isinstance(out["cache_dir"], str):
        raise _option_error("cache_dir", out["cache_dir"], "a directory path")
    return out


class OpenVinoGenAIBackend:
    """The "openvino-genai" backend. Options (``--longctx-backend=openvino-genai[device=CPU,...]``; each
    can also be given to ``open_runtime``): device (CPU, the default; GPU, NPU), precision (the inference
    precision hint: float32 (default), float16, bfloat16), kv_dtype (the KV cache precision, same names,
    default float32), threads (INFERENCE_NUM_THREADS, default OpenVINO's), cache_dir (where converted IRs
    are kept, default ~/.cache/pytest-longctx/openvino-genai), max_prompt_len / min_response_len (the NPU's
    static sizes, defaults 1024 / 128)."""

    name = "openvino-genai"

    def __init__(self, *, device: str = "CPU", precision: str = "float32", kv_dtype: str = "float32",
                 threads: Optional[int] = None, cache_dir: Optional[str] = None,
                 max_prompt_len: Optional[int] = None, min_response_len: Optional[int] = None) -> None:
        self._given = dict(device=device, precision=precision, kv_dtype=kv_dtype, threads=threads,
                           cache_dir=cache_dir, max_prompt_len=max_prompt_len, min_response_len=min_response_len)
        self.options = _settings(self._given)
        self._ov, self._genai = _import_openvino()
        self._core = self._ov.Core()
        available = list(self._core.available_devices)
        if not any(d == self.options["device"] or d.startswith(self.options["device"] + ".") for d in available):
            raise BackendUnavailable(f"OpenVINO device {self.options['device']} is not present "
                                     f"(available: {', '.join(available) or 'none'}){_npu_reason(self)}")

    def info(self) -> BackendInfo:
        device = self.options["device"]
        name, vendor = cpu_name_and_vendor() if device == "CPU" else (_device_name(self._core, device), "")
        versions = {
            "openvino": self._ov.get_version(),
            "openvino-genai": getattr(self._genai, "__version__", "unknown"),
            "device": device,
            "precision hint": PRECISIONS[self.options["precision"]],
            "kv cache precision": PRECISIONS[self.options["kv_dtype"]],
            "ir constants": "as saved by enable_save_ov_model (fp16-compressed)",
        }
        return BackendInfo(name=self.name, device_kind=device.lower(), device_name=name, vendor=vendor,
                           versions=versions, kv_dtypes=tuple(PRECISIONS), max_positions=None)

    def open_runtime(self, model: str, context: Optional[int] = None, **options: Any) -> "OpenVinoGenAIRuntime":
        """Load ``model`` (a .gguf file or a folder holding openvino_model.xml) with ``context`` positions."""
        settings = _settings({**self._given, **options})
        if context is not None and (not isinstance(context, int) or isinstance(context, bool) or context < 1):
            raise SpecError(f"context={context!r}, but should be a positive integer")
        ir, meta = resolve_model(self._genai, os.fspath(model), settings["cache_dir"])
        return OpenVinoGenAIRuntime(self._ov, self._core, ir, meta, context, settings)


def _npu_reason(backend: OpenVinoGenAIBackend) -> str:
    """Why the NPU plugin is absent, when OpenVINO says (its compiler library failing to load)."""
    if backend.options["device"] != "NPU":
        return ""
    try:
        backend._core.get_property("NPU", "FULL_DEVICE_NAME")
    except Exception as exc:  # the plugin's own reason, e.g. a library it cannot load
        return f": {one_line(exc, 200)}"
    return ""


def _device_name(core: Any, device: str) -> str:
    with contextlib.suppress(Exception):
        return str(core.get_property(device, "FULL_DEVICE_NAME"))
    return device


# ----------------------------------------------------------------------------- the model file


def resolve_model(genai: Any, path: str, cache_dir: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    """(the IR's .xml, the model's metadata): a GGUF is converted once into the cache, an IR folder is
    used where it is. Anything wrong is a one-line SpecError or NotSupported naming the path."""
    if not os.path.exists(path):
        raise SpecError(f"model {path!r} does not exist")
    if os.path.isdir(path):
        return _ir_folder(path)
    header = _gguf_header(path)
    folder = os.path.join(cache_dir or _default_cache(), _cache_key(path, genai))
    xml = os.path.join(folder, IR_FILE)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "w") as lock:  # pytest-xdist workers convert once, in turn
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(folder, SOURCE_FILE)):  # written last: a conversion completed
            _convert(genai, path, folder, header)
    return xml, {"source": "gguf", "path": path, "header": header}


def _gguf_header(path: str) -> Dict[str, Any]:
    """The GGUF's header, after refusing what the pipeline's reader cannot convert."""
    try:
        header = read_header(path)
    except GGUFHeaderError as exc:
        raise SpecError(f"model {path!r} is not a GGUF openvino-genai can read: {exc}") from None
    except OSError as exc:
        raise SpecError(f"model {path!r} cannot be read: {exc.strerror or exc}") from None
    arch = header.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise NotSupported(f"model {path!r} is a {arch!r} GGUF; openvino-genai converts {', '.join(ARCHITECTURES)}")
    tokenizer = header.get("tokenizer.ggml.model")
    if tokenizer != "gpt2":
        raise NotSupported(f"model {path!r} has a {tokenizer!r} tokenizer; openvino-genai converts only 'gpt2' "
                           f"(byte-level BPE) tokenizers from a GGUF")
    return header


def _default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pytest-longctx", "openvino-genai")


def _cache_key(path: str, genai: Any) -> str:
    """One folder per GGUF file state and openvino-genai version: a changed file is converted again."""
    status = os.stat(path)
    text = f"{os.path.abspath(path)}|{status.st_size}|{status.st_mtime_ns}|{getattr(genai, '__version__', '')}"
    stem = os.path.splitext(os.path.basename(path))[0][:40]
    return f"{stem}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _convert(genai: Any, path: str, folder: str, header: Dict[str, Any]) -> None:
    """LLMPipeline writes the IR next to the GGUF it is given: it is given a link to it in ``folder``,
    so the user's directory is left as it was."""
    link = os.path.join(folder, "model.gguf")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.abspath(path), link)
    try:
        pipeline = genai.LLMPipeline(link, "CPU", enable_save_ov_model=True)
        del pipeline
    except Exception as exc:
        file_type = header.get("general.file_type")
        kind = FILE_TYPES.get(file_type, f"file type {file_type}") if file_type is not None else "no file type"
        reason = _last_line(exc)
        if "quantization type" in reason:  # a weight type the reader has no path for (F32 among them)
            raise NotSupported(f"model {path!r} ({kind}): openvino-genai could not convert it: {reason} "
                               f"(it reads {', '.join(READABLE)} GGUFs)") from None
        raise SpecError(f"model {path!r} ({kind}): openvino-genai could not convert it: {reason}") from None
    if not os.path.isfile(os.path.join(folder, IR_FILE)):
        raise RuntimeFailure(f"openvino-genai converted {path!r} but wrote no {IR_FILE} in {folder}")
    with open(os.path.join(folder, SOURCE_FILE), "w", encoding="utf-8") as handle:
        json.dump({"gguf": os.path.abspath(path), "header": header}, handle, indent=1)


def _type_name(value: Any) -> str:
    """An OpenVINO element type as its short name (f32), whatever form the property comes in."""
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


def _last_line(exc: BaseException) -> str:
    """OpenVINO's messages start with the C++ file and line; the reason is the last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return one_line(Exception(lines[-1] if lines else type(exc).__name__))


def _ir_folder(path: str) -> Tuple[str, Dict[str, Any]]:
    xml = os.path.join(path, IR_FILE)
    if not os.path.isfile(xml):
        raise SpecError(f"model {path!r} is a folder without {IR_FILE} (an OpenVINO IR folder is expected)")
    for name, kind in ((SOURCE_FILE, "converted"), ("config.json", "config")):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            try:
                with open(file, encoding="utf-8") as handle:
                    data = json.load(handle)
            except (OSError, ValueError) as exc:
                raise SpecError(f"model {path!r}: {name} cannot be read ({one_line(exc)})") from None
            if kind == "converted":
                return xml, {"source": "gguf", "path": data.get("gguf", path), "header": data["header"]}
            return xml, {"source": "config", "path": path, "config": data}
    raise SpecError(f"model {path!r} has neither config.json nor {SOURCE_FILE}: its context and "
                    f"geometry are not stated")


def model_limit(meta: Dict[str, Any]) -> Optional[int]:
    if meta["source"] == "gguf":
        header = meta["header"]
        value = header.get(f"{header['general.architecture']}.context_length")
        return int(value) if value else None
    value = meta["config"].get("max_position_embeddings")
    return int(value) if value else None


def spec_of(meta: Dict[str, Any], context: int, kv_dtype: str) -> CacheSpec:
    """The model's KV geometry from the GGUF header (as llama.cpp reads it) or config.json."""
    if meta["source"] == "config":
        from .transformers_backend import spec_of as config_spec

        return config_spec(SimpleNamespace(**meta["config"]), context, kv_dtype, meta["path"])
    header = meta["header"]
    arch = header["general.architecture"]

    def number(key: str) -> Optional[float]:
        value = header.get(f"{arch}.{key}")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    layers, heads, width = number("block_count"), number("attention.head_count"), number("embedding_length")
    if not (layers and heads and width):
        raise NotSupported(f"model {meta['path']!r} does not state block_count, attention.head_count and "
                           f"embedding_length as scalars")
    head_dim = int(number("attention.key_length") or width // heads)
    # llama.cpp's llama rotates adjacent pairs (its converter permutes Q/K for that); qwen2/3 rotate halves.
    style = "gptj" if arch == "llama" else "neox"
    rope = RopeSpec(theta=number("rope.freq_base") or 10000.0, style=style)
    return CacheSpec(n_layers=int(layers), n_heads=int(heads), n_kv_heads=int(number("attention.head_count_kv") or heads),
                     head_dim=head_dim, max_positions=context, kv_dtype=kv_dtype, rope=rope)


# ----------------------------------------------------------------------------- the runtime


def slice_logits_to_last(ov: Any, model: Any) -> bool:
    """Feed the LM head only the last position's hidden state (as openvino-genai does before it
    compiles): True when the MatMul producing the logits was found and its input sliced."""
    from openvino import opset13 as ops

    results = [r for r in model.get_results() if "logits" in r.output(0).get_names()
               or "logits" in r.input(0).get_source_output().get_names()]
    if len(results) != 1:
        return False
    node = results[0].input(0).get_source_output().get_node()
    while node.get_type_name() != "MatMul":  # through element-wise ops after the head (softcap, casts)
        if node.get_input_size() < 1 or node.get_type_name() not in ("Convert", "Multiply", "Divide", "Tanh", "Add"):
            return False
        node = node.input(0).get_source_output().get_node()
    hidden = node.input(0).get_source_output()
    last = ops.slice(hidden, np.array([-1], np.int64), np.array([np.iinfo(np.int64).max], np.int64),
                     np.array([1], np.int64), np.array([1], np.int64))
    node.input(0).replace_source_output(last.output(0))
    model.validate_nodes_and_infer_types()
    return True


class OpenVinoGenAIRuntime(RuntimeBase):
    """One converted model compiled by OpenVINO, one infer request (its state is the KV cache)."""

    def __init__(self, ov: Any, core: Any, xml: str, meta: Dict[str, Any], context: Optional[int],
                 settings: Dict[str, Any]) -> None:
        self._ov = ov
        self.model_path = meta["path"]
        self.ir_path = xml
        self.settings = settings
        self._request: Any = None
        self._compiled: Any = None
        self._logits: Optional[np.ndarray] = None
        self._held = 0
        self._times = dict(prefill_seconds=0.0, prefill_tokens=0, generate_seconds=0.0, generate_tokens=0)
        self.model_context_limit = model_limit(meta)
        self.context_limit = self._grant(context)
        self.kv_spec = spec_of(meta, self.context_limit, settings["kv_dtype"])
        self._compile(core, xml)

    def _grant(self, context: Optional[int]) -> int:
        limit = self.model_context_limit
        if self.settings["device"] == "NPU":
            static = (self.settings["max_prompt_len"] or NPU_PROMPT) + (self.settings["min_response_len"] or NPU_RESPONSE)
            limit = static if limit is None else min(limit, static)
        if limit is None and context is None:
            raise SpecError(f"model {self.model_path!r} does not state its context; give a context")
        if limit is not None and context is not None and context > limit:
            warnings.warn(ContextClamped(context, limit, detail="OpenVINO would run past the model's context"),
                          stacklevel=4)
            return limit
        return context if context is not None else int(limit)  # type: ignore[arg-type]

    def _compile(self, core: Any, xml: str) -> None:
        s = self.settings
        try:
            model = core.read_model(xml)
        except Exception as exc:
            raise SpecError(f"model {xml!r}: OpenVINO cannot read it: {_last_line(exc)}") from None
        names = {name for port in model.inputs for name in port.get_names()}
        missing = {"input_ids", "attention_mask", "position_ids", "beam_idx"} - names
        if missing or not model.get_sinks():
            raise NotSupported(f"model {xml!r} is not a stateful LLM IR (inputs missing: "
                               f"{', '.join(sorted(missing)) or 'none'}; state: {len(model.get_sinks())} assigns)")
        self.sliced = slice_logits_to_last(self._ov, model)
        config: Dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISIONS[s["precision"]],
                                  "KV_CACHE_PRECISION": PRECISIONS[s["kv_dtype"]]}
        if s["threads"]:
            config["INFERENCE_NUM_THREADS"] = s["threads"]
        if s["device"] == "NPU":
            config.update({"NPU_USE_NPUW": "YES", "NPUW_LLM": "YES",
                           "NPUW_LLM_MAX_PROMPT_LEN": s["max_prompt_len"] or NPU_PROMPT,
                           "NPUW_LLM_MIN_RESPONSE_LEN": s["min_response_len"] or NPU_RESPONSE})
        try:
            self._compiled = core.compile_model(model, s["device"], config)
        except Exception as exc:
            raise NotSupported(f"OpenVINO could not compile {xml!r} for {s['device']} with {config}: "
                               f"{_last_line(exc)}") from None
        self.compiled_precisions = {key: _type_name(self._compiled.get_property(key))
                                    for key in ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION")}
        wrong = {k: v for k, v in self.compiled_precisions.items() if v != config[k]}
        if wrong and s["device"] == "CPU":  # a CPU without bf16/f16 arithmetic falls back silently
            raise NotSupported(f"OpenVINO compiled {xml!r} for CPU with {wrong}, not the {config} asked for")
        self._request = self._compiled.create_infer_request()
        self.vocab_size = int(self._compiled.output("logits").get_partial_shape()[-1].get_length())

    # --- the contract ---

    def positions(self) -> int:
        self._check_open()
        return self._held

    def state_positions(self) -> int:
        """Positions the model state holds, read from OpenVINO (copies one layer's keys)."""
        self._check_open()
        states = self._request.query_state()
        if not states:
            return 0
        shape = tuple(states[0].state.shape)
        return int(shape[2]) if len(shape) == 4 else 0

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        self._check_open()
        ids = C.token_ids(token_ids, self.vocab_size, np.int64)
        started = time.perf_counter()
        try:
            logits = self._infer(ids, "prefill")
        finally:
            self._times["prefill_seconds"] += time.perf_counter() - started
        self._times["prefill_tokens"] += len(ids)
        return logits.copy()

    def generate(self, n: int) -> List[int]:
        self._check_generate(n)
        out: List[int] = []
        started = time.perf_counter()
        try:
            for _ in range(n):
                token = int(np.argmax(self._logits))
                self._infer(np.array([token], np.int64), "generate")
                out.append(token)
        finally:
            self._times["generate_seconds"] += time.perf_counter() - started
            self._times["generate_tokens"] += len(out)
        return out

    def reset(self) -> None:
        self._check_open()
        self._request.reset_state()
        self._held = 0
        self._logits = None

    def stats(self) -> RuntimeStats:
        return RuntimeStats(**self._times)

    def close(self) -> None:
        self._request = None
        self._compiled = None

    # --- OpenVINO calls ---

    def _is_open(self) -> bool:
        return self._request is not None

    def _infer(self, ids: np.ndarray, call: str) -> np.ndarray:
        n, at = len(ids), self._held
        inputs = {
            "input_ids": ids.reshape(1, n),
            "attention_mask": np.ones((1, at + n), np.int64),
            "position_ids": np.arange(at, at + n, dtype=np.int64).reshape(1, n),
            "beam_idx": np.zeros(1, np.int32),
        }
        try:
            self._request.infer(inputs)
        except Exception as exc:
            self._logits = None
            with contextlib.suppress(Exception):
                self._held = self.state_positions()
            raise RuntimeFailure(f"OpenVINO infer failed in {call} of {n} tokens at position {at} of "
                                 f"{self.model_path!r} (the state holds {self._held} positions now): "
                                 f"{_last_line(exc)}") from None
        self._held = at + n
        logits = self._request.get_tensor("logits").data
        self._logits = np.array(logits[0, -1], dtype=np.float32)
        return self._logits
