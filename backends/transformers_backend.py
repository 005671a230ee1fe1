"""The "transformers" backend: a local Hugging Face model directory run by transformers.

A whole-model runtime (``RuntimeBackend``): the suite sees token ids, logits,
positions and statistics, never the KV cache. The model is loaded with
``AutoModelForCausalLM.from_pretrained(DIR, local_files_only=True)``: nothing
is ever downloaded, so a run certifies exactly the files on disk.

What it reports and why:

- ``model_context_limit`` is the config's ``max_position_embeddings`` (what the
  model's RoPE tables and training were sized for).
- The KV cache is transformers' ``StaticCache`` sized to ``context_limit`` and
  allocated in full when the runtime opens (``early_initialization``): the
  memory the run will need is taken (and checked against what is free) up
  front, not when the first prompt arrives, so the memory group sees a
  runtime that does not grow. Its size is checked before it is allocated.
- A context above ``max_position_embeddings`` is clamped to it with a
  ``ContextClamped`` warning naming both numbers: transformers itself would
  rotate past what the model was trained on without a word.
- A prompt that would pass ``context_limit`` is refused with
  ``ContextLimitExceeded`` before the model runs: ``StaticLayer.update``
  advances its length before it writes, so a write past the end would leave
  the cache's count wrong. Any other failure inside the forward pass restores
  every layer's length to what it was and is a ``RuntimeFailure``: the
  context is never half-extended.
- ``kv_spec`` comes from the text config (layers, heads, KV heads, head_dim,
  ``rope_parameters`` or the older ``rope_theta``/``rope_scaling``, sliding
  window, softcap); its ``kv_dtype`` is the dtype the cache holds (the
  model's dtype, option ``dtype``).
- ``positions()`` is the cache's own count (``get_seq_length()``), not a
  counter kept beside it, so it tells the truth after any failure.

Written against transformers 5.x (the forward pass takes ``cache=``; 4.x's
``past_key_values=`` is used where the model's forward still names it); its
tests pass with transformers 4.56.0, 4.57.6, 5.0.0, 5.12.1 and 5.25.0 on
torch 2.13.0 (CPU), and an older transformers is refused at start. torch and
transformers are imported when the backend is constructed: without them the
backend is unavailable, with the install command.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from pytest_longctx.errors import (
    BackendUnavailable, ContextClamped, ContextLimitExceeded, NotSupported, RuntimeFailure, SpecError,
)
from pytest_longctx.protocol import BackendInfo, RuntimeStats
from pytest_longctx.spec import CacheSpec, RopeSpec

from . import _checks as C
from ._host import cpu_name_and_vendor, one_line
from ._runtime import RuntimeBase

OPTIONS = ("device", "dtype", "threads", "attn", "n_batch", "verbose")
DTYPES = ("float32", "float16", "bfloat16")
ATTENTION = ("sdpa", "eager")
DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps")
# The oldest transformers the tests passed on (4.55 has neither StaticCache(config, max_cache_len)
# nor from_pretrained(dtype=)); also tested: 4.57.6, 5.0.0, 5.12.1, 5.25.0.
MIN_TRANSFORMERS = (4, 56)


def _import_torch() -> Tuple[Any, Any]:
    """torch and transformers, or BackendUnavailable naming what is missing and how to install it."""
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailable(
            f"torch is not installed ({exc}); pip install torch==<version for your device> first, then "
            f"pip install 'pytest-longctx[transformers]'"
        ) from None
    try:
        import transformers
        from transformers import StaticCache  # noqa: F401  (the cache this backend is built on)
    except ImportError as exc:
        raise BackendUnavailable(
            f"transformers with StaticCache is not importable ({one_line(exc)}); "
            f"pip install 'pytest-longctx[transformers]'"
        ) from None
    if _release(transformers.__version__) < MIN_TRANSFORMERS:
        raise BackendUnavailable(
            f"transformers {transformers.__version__} is older than {'.'.join(map(str, MIN_TRANSFORMERS))}, the "
            f"first release with the StaticCache(config, max_cache_len) and from_pretrained(dtype=) this backend "
            f"uses; pip install -U 'transformers>={'.'.join(map(str, MIN_TRANSFORMERS))}'"
        )
    return torch, transformers


def _release(version: str) -> Tuple[int, int]:
    """(major, minor) of a version string such as 4.57.6 or 5.0.0rc1."""
    parts = re.findall(r"\d+", version)[:2]
    return (int(parts[0]), int(parts[1])) if len(parts) == 2 else (0, 0)


def _option_error(key: str, value: Any, expected: str) -> SpecError:
    return SpecError(f"transformers backend option {key}={value!r}, but should be {expected} "
                     f"(accepted keys: {', '.join(OPTIONS)})")


def _settings(options: Dict[str, Any]) -> Dict[str, Any]:
    """Checked options: every key of OPTIONS (``kv_dtype`` is the contract's name for dtype)."""
    unknown = [key for key in options if key not in OPTIONS and key != "kv_dtype"]
    if unknown:
        raise SpecError(f"transformers backend option {unknown[0]!r} is unknown "
                        f"(accepted keys: {', '.join(OPTIONS)})")
    out = dict(options)
    if "kv_dtype" in out:
        out["dtype"] = out.pop("kv_dtype")
    if out["dtype"] not in DTYPES:
        raise _option_error("dtype", out["dtype"], f"one of {', '.join(DTYPES)}")
    if out["attn"] not in ATTENTION:
        raise _option_error("attn", out["attn"], f"one of {', '.join(ATTENTION)}")
    for key in ("threads", "n_batch"):
        value = out.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise _option_error(key, value, "a positive integer")
    if not isinstance(out.get("verbose"), bool):
        raise _option_error("verbose", out.get("verbose"), "true or false")
    if not isinstance(out.get("device"), str):
        raise _option_error("device", out.get("device"), "a torch device such as cpu, cuda or cuda:1")
    return out


def _device(torch: Any, text: str) -> Any:
    """The torch device asked for, or one line naming what was asked and what exists here."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise _option_error("device", text, f"a torch device such as cpu, cuda or cuda:1 ({one_line(exc)})") from None
    if device.type == "cpu":
        return device
    if device.type not in DEVICE_TYPES:
        raise _option_error("device", text, f"one of {', '.join(DEVICE_TYPES)} (with an index)")
    module = getattr(torch, device.type, None)
    available = bool(module is not None and module.is_available())
    count = int(module.device_count()) if available and hasattr(module, "device_count") else (1 if available else 0)
    if not available or count == 0:
        raise BackendUnavailable(
            f"device={text} asked, but torch {torch.__version__} here has no usable {device.type} device "
            f"(devices here: {', '.join(_devices(torch))})"
        )
    if device.index is not None and device.index >= count:
        raise BackendUnavailable(
            f"device={text} asked, but torch sees {count} {device.type} device(s): "
            f"{', '.join(f'{device.type}:{i}' for i in range(count))}"
        )
    return device


def _devices(torch: Any) -> List[str]:
    out = ["cpu"]
    for kind in DEVICE_TYPES[1:]:
        module = getattr(torch, kind, None)
        with contextlib.suppress(Exception):
            if module is not None and module.is_available():
                count = int(module.device_count()) if hasattr(module, "device_count") else 1
                out += [f"{kind}:{i}" for i in range(count)]
    return out


class TransformersBackend:
    """The "transformers" backend. Options (``--longctx-backend=transformers[device=cpu,dtype=float32]``;
    each can also be given to ``open_runtime``): device (a torch device: cpu (default), cuda, cuda:1,
    xpu, mps), dtype (the weights' and so the KV cache's dtype: float32 (default), float16, bfloat16;
    ``kv_dtype`` is accepted as its contract name), threads (torch's intra-op threads, process-wide;
    default: torch's own choice), attn (the attention implementation: sdpa (default) or eager),
    n_batch (tokens per forward pass of a prompt; default: the whole prompt in one pass), verbose
    (transformers' progress bars and warnings while loading, default false)."""

    name = "transformers"
    runtime_class: type = None  # type: ignore[assignment]  # TransformersRuntime, set below the class

    def __init__(self, *, device: str = "cpu", dtype: str = "float32", threads: Optional[int] = None,
                 attn: str = "sdpa", n_batch: Optional[int] = None, verbose: bool = False) -> None:
        self._given = dict(device=device, dtype=dtype, threads=threads, attn=attn, n_batch=n_batch,
                           verbose=verbose)
        self.options = _settings(self._given)
        self._torch, self._transformers = _import_torch()
        self.device = _device(self._torch, self.options["device"])
        if self.options["threads"] is not None:
            self._torch.set_num_threads(self.options["threads"])

    def info(self) -> BackendInfo:
        torch = self._torch
        if self.device.type == "cpu":
            device_name, vendor, kind = *cpu_name_and_vendor(), "cpu"
        else:
            module = getattr(torch, self.device.type)
            device_name = str(module.get_device_name(self.device)) if hasattr(module, "get_device_name") else ""
            vendor, kind = "", "gpu"
        return BackendInfo(
            name=self.name, device_kind=kind, device_name=device_name, vendor=vendor,
            versions={"torch": torch.__version__, "transformers": self._transformers.__version__,
                      "device": str(self.device), "dtype": self.options["dtype"], "attn": self.options["attn"],
                      "threads": str(torch.get_num_threads())},
            kv_dtypes=DTYPES, max_positions=None,
        )

    def open_runtime(self, model: str, context: Optional[int] = None, **options: Any) -> "TransformersRuntime":
        """Load ``model`` (a local Hugging Face model directory) with ``context`` positions
        (None: the model's ``max_position_embeddings``)."""
        settings = _settings({**self._given, **options})
        device = _device(self._torch, settings["device"]) if "device" in options else self.device
        if context is not None and (not isinstance(context, int) or isinstance(context, bool) or context < 1):
            raise SpecError(f"context={context!r}, but should be a positive integer")
        return self.runtime_class(self._torch, self._transformers, os.fspath(model), context, settings, device)


def _check_model_dir(path: str) -> Dict[str, Any]:
    """A missing path, a file, or a directory without a readable config.json, named before transformers'
    own longer failure (which may also mention the Hub it will not be asked)."""
    if not os.path.exists(path):
        raise SpecError(f"model {path!r} does not exist")
    if not os.path.isdir(path):
        raise SpecError(f"model {path!r} is not a directory (a Hugging Face model directory with config.json "
                        f"and weights is expected)")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise SpecError(f"model {path!r} is not a Hugging Face model directory: it has no config.json")
    try:
        with open(config, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, ValueError) as exc:
        raise SpecError(f"model {path!r}: config.json cannot be read ({one_line(exc)})") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise SpecError(f"model {path!r}: config.json names no model_type")
    return raw


def _number(config: Any, *names: str) -> Optional[Any]:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def rope_of(config: Any, head_dim: int) -> RopeSpec:
    """The contract's RopeSpec of a transformers text config (5.x rope_parameters or 4.x rope_scaling)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    params = {**scaling, **params}
    theta = float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)
    kind = params.get("rope_type") or params.get("type") or "default"
    style = "gptj" if getattr(config, "model_type", "") in ("gptj", "codegen") else "neox"
    args: Dict[str, Any] = {"theta": theta, "style": style}
    partial = params.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None)
    if partial and float(partial) < 1.0:
        args["rotary_dim"] = int(head_dim * float(partial))
    original = params.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None)
    factor = params.get("factor")
    if kind == "default":
        pass
    elif kind == "linear":
        args.update(kind="linear", factor=float(factor))
    elif kind == "dynamic":
        args.update(kind="dynamic", factor=float(factor),
                    original_max_positions=int(original or config.max_position_embeddings))
    elif kind == "yarn":
        args.update(kind="yarn", factor=float(factor),
                    original_max_positions=int(original or config.max_position_embeddings),
                    beta_fast=params.get("beta_fast"), beta_slow=params.get("beta_slow"),
                    attention_factor=params.get("attention_factor"))
    elif kind == "longrope":
        args.update(kind="longrope", original_max_positions=int(original or config.max_position_embeddings),
                    short_factor=tuple(params["short_factor"]), long_factor=tuple(params["long_factor"]),
                    attention_factor=params.get("attention_factor"))
    elif kind == "llama3":
        args.update(kind="llama3", factor=float(factor), original_max_positions=int(original),
                    low_freq_factor=float(params["low_freq_factor"]),
                    high_freq_factor=float(params["high_freq_factor"]))
    else:
        raise NotSupported(f"rope_type {kind!r} of this model has no RopeSpec kind in the contract")
    return RopeSpec(**args)


def spec_of(config: Any, context: int, kv_dtype: str, path: str) -> CacheSpec:
    """The model's KV geometry as a CacheSpec (max_positions = the context in force)."""
    n_layers = _number(config, "num_hidden_layers", "n_layer", "num_layers")
    n_heads = _number(config, "num_attention_heads", "n_head")
    width = _number(config, "hidden_size", "n_embd")
    if not (n_layers and n_heads and width):
        raise NotSupported(f"model {path!r} ({config.model_type}): its config does not state the layer count, "
                           f"head count and hidden size as numbers")
    n_kv = _number(config, "num_key_value_heads") or n_heads
    head_dim = _number(config, "head_dim") or width // n_heads
    types = set(getattr(config, "layer_types", None) or ())
    window = None
    if "sliding_attention" in types and len(types) > 1:
        raise NotSupported(f"model {path!r} mixes sliding-window and full-attention layers "
                           f"({', '.join(sorted(types))}); the contract's CacheSpec has one window")
    # layer_types (transformers 5.x) says which layers use the window; older configs say it with
    # use_sliding_window alone.
    sliding = "sliding_attention" in types if types else bool(getattr(config, "use_sliding_window", False))
    if sliding and getattr(config, "sliding_window", None):
        window = int(config.sliding_window)
    return CacheSpec(
        n_layers=int(n_layers), n_heads=int(n_heads), n_kv_heads=int(n_kv), head_dim=int(head_dim),
        max_positions=context, kv_dtype=kv_dtype, rope=rope_of(config, int(head_dim)), sliding_window=window,
        softcap=getattr(config, "attn_logit_softcapping", None),
    )


class TransformersRuntime(RuntimeBase):
    """One loaded model and one static KV cache (a single sequence, batch 1)."""

    def __init__(self, torch: Any, transformers: Any, path: str, context: Optional[int],
                 settings: Dict[str, Any], device: Any) -> None:
        self._torch = torch
        self.model_path = path
        self.settings = settings
        self.device = device
        self._model: Any = None
        self._cache: Any = None
        self._logits: Optional[np.ndarray] = None
        self._times = dict(prefill_seconds=0.0, prefill_tokens=0, generate_seconds=0.0, generate_tokens=0)
        _check_model_dir(path)
        self._config = self._load_config(transformers)
        self.model_context_limit: Optional[int] = _number(self._config, "max_position_embeddings", "n_positions")
        self.context_limit = self._grant(context)
        self.kv_spec = spec_of(self._config, self.context_limit, settings["dtype"], path)
        self._check_room()
        self._model = self._load_model(transformers)
        self.vocab_size = int(self._model.get_output_embeddings().weight.shape[0])
        self._cache = self._open_cache(transformers)
        self._cache_kwarg = _cache_keyword(self._model)

    # --- opening ---

    def _quiet(self, transformers: Any) -> Any:
        """transformers' progress bars and warnings silenced while loading, unless verbose."""
        if self.settings["verbose"]:
            return contextlib.nullcontext()
        return _Quiet(transformers)

    def _load_config(self, transformers: Any) -> Any:
        try:
            with self._quiet(transformers):
                config = transformers.AutoConfig.from_pretrained(self.model_path, local_files_only=True)
        except Exception as exc:  # an unknown model_type, a malformed field
            raise SpecError(f"model {self.model_path!r}: transformers cannot read its config "
                            f"({type(exc).__name__}: {one_line(exc)})") from None
        return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config

    def _grant(self, context: Optional[int]) -> int:
        limit = self.model_context_limit
        if context is None:
            if limit is None:
                raise SpecError(f"model {self.model_path!r} does not state max_position_embeddings; give a context")
            return int(limit)
        if limit is not None and context > limit:
            warnings.warn(ContextClamped(context, int(limit), detail="the model's max_position_embeddings"),
                          stacklevel=4)
            return int(limit)
        return context

    def _check_room(self) -> None:
        """The weights (their bytes on disk, a lower bound when loaded in a wider dtype) and the
        static cache against what the device has free, before anything is allocated."""
        cache = self.kv_spec.kv_bytes(self.context_limit)
        weights = _weight_bytes(self.model_path)
        free, place = _free_memory(self._torch, self.device)
        if free is not None and cache + weights > free:
            raise NotSupported(f"model {self.model_path!r} needs at least {(cache + weights) / 2**30:.2f} GiB "
                               f"(weights {weights / 2**30:.2f} GiB on disk, static KV cache of "
                               f"{self.context_limit} positions {cache / 2**30:.2f} GiB), but {place} has "
                               f"{free / 2**30:.2f} GiB free")

    def _load_model(self, transformers: Any) -> Any:
        torch = self._torch
        try:
            with self._quiet(transformers):
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    self.model_path, local_files_only=True, dtype=getattr(torch, self.settings["dtype"]),
                    attn_implementation=self.settings["attn"])
        except Exception as exc:  # no weights, weights of another shape, not a causal LM
            raise SpecError(f"model {self.model_path!r}: transformers cannot load it as a causal LM "
                            f"({type(exc).__name__}: {one_line(exc)})") from None
        try:
            return model.to(self.device).eval()
        except Exception as exc:  # out of device memory, a dtype the device lacks
            raise NotSupported(f"model {self.model_path!r} cannot be placed on {self.device} in "
                               f"{self.settings['dtype']} ({type(exc).__name__}: {one_line(exc)})") from None

    def _open_cache(self, transformers: Any) -> Any:
        spec, torch = self.kv_spec, self._torch
        cache = transformers.StaticCache(config=self._model.config, max_cache_len=self.context_limit)
        try:
            cache.early_initialization(batch_size=1, num_heads=spec.n_kv_heads, head_dim=spec.head_dim,
                                       dtype=getattr(torch, self.settings["dtype"]), device=self.device)
        except Exception as exc:
            raise NotSupported(f"a static KV cache of {self.context_limit} positions on {self.device} could not "
                               f"be allocated ({type(exc).__name__}: {one_line(exc)})") from None
        return cache

    # --- the contract ---

    def positions(self) -> int:
        """The cache's own count of the positions it holds."""
        self._check_open()
        return int(self._cache.get_seq_length())

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = self._ids(token_ids)
        before = self.positions()
        if before + len(ids) > self.context_limit:
            raise ContextLimitExceeded(None, before, len(ids), self.context_limit,
                                       detail="refused before the model ran; the context is unchanged")
        step = self.settings["n_batch"] or len(ids)
        began = time.perf_counter()
        try:
            for start in range(0, len(ids), step):
                logits = self._forward(ids[start:start + step], "prefill", before)
        finally:
            self._times["prefill_seconds"] += time.perf_counter() - began
            self._times["prefill_tokens"] += max(self.positions() - before, 0)
        return logits.copy()

    def generate(self, n: int) -> List[int]:
        self._check_generate(n)
        before = self.positions()
        if before + n > self.context_limit:
            raise ContextLimitExceeded(None, before, n, self.context_limit,
                                       detail="generation refused before the model ran")
        out: List[int] = []
        began = time.perf_counter()
        try:
            for _ in range(n):
                token = int(np.argmax(self._logits))
                self._forward(np.array([token], dtype=np.int64), "generate", before)
                out.append(token)
        finally:
            self._times["generate_seconds"] += time.perf_counter() - began
            self._times["generate_tokens"] += max(self.positions() - before, 0)
        return out

    def reset(self) -> None:
        """Empty the static cache (zero its tensors and lengths); the model stays loaded."""
        self._check_open()
        self._cache.reset()
        self._logits = None

    def stats(self) -> RuntimeStats:
        peak = None
        if self.device.type == "cuda":
            peak = int(self._torch.cuda.max_memory_allocated(self.device))
        return RuntimeStats(**self._times, peak_memory_bytes=peak)

    def close(self) -> None:
        self._cache = None
        self._model = None

    # --- the model ---

    def _is_open(self) -> bool:
        return self._model is not None

    def _ids(self, token_ids: Sequence[int]) -> np.ndarray:
        self._check_open()
        return C.token_ids(token_ids, self.vocab_size, np.int64)

    def _positions_of(self, at: int, n: int) -> Dict[str, Any]:
        """Extra forward arguments placing the tokens: none, transformers takes the positions
        from the cache's length (a broken variant in the tests overrides this)."""
        return {}

    def _forward(self, ids: np.ndarray, call: str, began_at: int) -> np.ndarray:
        """One forward pass extending the cache by ``ids``; the last position's logits.

        On any failure every layer's length goes back to what it was, so the context
        holds exactly what it held before the pass."""
        torch = self._torch
        lengths = [_length(layer) for layer in self._cache.layers]
        at = self.positions()
        try:
            with torch.inference_mode():
                tokens = torch.as_tensor(ids, device=self.device).unsqueeze(0)
                out = self._model(input_ids=tokens, use_cache=True, logits_to_keep=1,
                                  **self._positions_of(at, len(ids)), **{self._cache_kwarg: self._cache})
                logits = out.logits[0, -1].float().cpu().numpy()
        except Exception as exc:
            for layer, length in zip(self._cache.layers, lengths):
                _set_length(layer, length, at, len(ids))
            raise RuntimeFailure(
                f"transformers failed in {call} of {len(ids)} tokens at position {at} of {self.model_path!r} "
                f"({type(exc).__name__}: {one_line(exc)}); the context holds {self.positions()} positions "
                f"({self.positions() - began_at:+d} since the call began)"
            ) from None
        self._logits = logits
        return logits


TransformersBackend.runtime_class = TransformersRuntime


def _length(layer: Any) -> Any:
    """A cache layer's length as it stores it: a tensor (static layers) or an int."""
    value = getattr(layer, "cumulative_length", None)
    return value.clone() if hasattr(value, "clone") else value


def _set_length(layer: Any, value: Any, at: int, n: int) -> None:
    """Put a layer's length back to ``value`` after a failed pass that wrote ``n`` slots from ``at``."""
    if hasattr(value, "clone"):
        layer.cumulative_length.copy_(value)
    elif value is not None:
        layer.cumulative_length = value
    else:  # transformers 5.0's static layer has no counter: its length is its count of non-zero key slots
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                tensor[:, :, at:at + n].zero_()


def _cache_keyword(model: Any) -> str:
    """The forward pass's name for the cache: ``cache`` (transformers 5.x) or ``past_key_values`` (4.x)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _weight_bytes(path: str) -> int:
    """Bytes of the weight files in a model directory (safetensors or PyTorch pickles)."""
    total = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(path):
            if entry.is_file() and entry.name.endswith((".safetensors", ".bin", ".pt", ".pth")):
                total += entry.stat().st_size
    return total


def _free_memory(torch: Any, device: Any) -> Tuple[Optional[int], str]:
    """Bytes free where the cache will live, and the name of that place (None: unknown)."""
    if device.type == "cuda":
        with contextlib.suppress(Exception):
            free, _ = torch.cuda.mem_get_info(device)
            return int(free), str(device)
        return None, str(device)
    if device.type == "cpu":
        with contextlib.suppress(Exception):
            import psutil

            return int(psutil.virtual_memory().available), "host memory"
    return None, str(device)


class _Quiet:
    """transformers' logging at error level and its progress bars off for one load; restored after."""

    def __init__(self, transformers: Any) -> None:
        self._logging = transformers.utils.logging

    def __enter__(self) -> None:
        self._level = self._logging.get_verbosity()
        self._bars = self._logging.is_progress_bar_enabled()
        self._logging.set_verbosity_error()
        self._logging.disable_progress_bar()

    def __exit__(self, *exc: Any) -> None:
        self._logging.set_verbosity(self._level)
        if self._bars:
            self._logging.enable_progress_bar()
