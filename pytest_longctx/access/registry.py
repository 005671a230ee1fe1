"""Finding and constructing backends: ``load_backend`` works outside pytest too.

A backend is named three ways: a built-in (or a device-kind alias of one), a
name registered by a third-party package (entry-point group
``pytest_longctx.backends`` or the ``pytest_longctx_backends`` hook), or an
import path ``package.module:factory``. Any of them takes options as
``NAME[key=value,...]``. Registered names never contain ``:``.

Built-ins are listed below as ``module:factory`` text and resolved by importlib
when chosen, exactly as a third party's entry point is: the plugin never imports
``pytest_longctx.backends`` (the layering test holds that arrow), and listing
them imports nothing heavy.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Union

from ..errors import BackendUnavailable, LongctxError, SpecError
from ..protocol import KVBackend, RuntimeBackend
from .runcontrol import captured

Backend = Union[KVBackend, RuntimeBackend]
Factory = Union[Callable[..., Backend], str]
_KV_METHODS = ("name", "info", "open_cache", "asarray", "to_numpy", "synchronize", "memory_in_use")
_RUNTIME_METHODS = ("name", "info", "open_runtime")

ENTRY_POINT_GROUP = "pytest_longctx.backends"
_NAME = re.compile(r"^[A-Za-z_][\w.\-]*$")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class Builtin(NamedTuple):
    factory: str  # "module:attribute", called with the backend's options
    device_kind: str
    kind: str = "cache"  # "cache": a KVBackend; "runtime": a RuntimeBackend (whole model)


BUILTINS = {
    "numpy": Builtin("pytest_longctx.backends.numpy_backend:NumpyBackend", "cpu"),
    "cupy": Builtin("pytest_longctx.backends.cupy_backend:CupyBackend", "gpu"),
    "onnxruntime": Builtin("pytest_longctx.backends.onnxruntime_backend:OnnxRuntimeBackend", "cpu"),
    "rkllm": Builtin("pytest_longctx.backends.rkllm_backend:RkllmBackend", "npu", "runtime"),
    "llamacpp": Builtin("pytest_longctx.backends.llamacpp_backend:LlamaCppBackend", "cpu", "runtime"),
    # Kind "cpu" although it runs on GPUs too: aliases take the first available built-in of a
    # kind, so "cpu" always finds numpy first, while "gpu" would land on torch's CPU fallback
    # when CuPy is missing. torch is reached by name; its info() says where it runs.
    "torch": Builtin("pytest_longctx.backends.torch_backend:TorchBackend", "cpu"),
    "transformers": Builtin("pytest_longctx.backends.transformers_backend:TransformersBackend", "cpu", "runtime"),
    # A GGUF converted by openvino-genai, its stateful IR run by openvino.Core (CPU here; GPU/NPU by option).
    "openvino-genai": Builtin("pytest_longctx.backends.openvino_genai_backend:OpenVinoGenAIBackend", "cpu",
                              "runtime"),
    # OpenVINO's CPU plugin by default; openvino[device=NPU] is a member of the "npu" alias, tried
    # after rkllm (see ALIAS_MEMBERS).
    "openvino": Builtin("pytest_longctx.backends.openvino_backend:OpenVinoBackend", "cpu"),
}

# Device-kind aliases: the first available built-in of that kind is used.
ALIASES = {"cpu": "cpu", "gpu": "gpu", "npu": "npu"}

# Built-ins an alias also reaches with options that put them on that kind of device, tried after
# the built-ins of that kind: "npu" is the NPU that is present, RKLLM's (Rockchip) first, as
# before, then Intel's through OpenVINO. No machine has both, so the order decides only which
# reasons come first when neither is there.
ALIAS_MEMBERS = {"npu": (("openvino", {"device": "NPU"}),)}


class BackendLoadError(LongctxError):
    """A backend's module or factory raised; every case of that backend reports it."""


@dataclass(frozen=True)
class BackendRef:
    """A parsed ``--longctx-backend`` value."""

    text: str
    name: str
    options: Dict[str, Any] = field(default_factory=dict)

    @property
    def is_import_path(self) -> bool:
        return ":" in self.name


def _option_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_backend(text: str) -> BackendRef:
    """Split ``NAME[key=value,...]`` into name and options; malformed text is a SpecError."""
    text = text.strip()
    name, bracket, rest = text.partition("[")
    name = name.strip()
    options: Dict[str, Any] = {}
    if bracket:
        if not rest.endswith("]"):
            raise SpecError(f"backend {text!r}: options must be closed with ']'")
        body = rest[:-1].strip()
        for item in filter(None, (part.strip() for part in body.split(","))):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key or not value:
                raise SpecError(f"backend {text!r}: option {item!r} is not key=value")
            options[key] = _option_value(value)
    if ":" in name:
        if not _IMPORT_PATH.match(name):
            raise SpecError(f"backend {text!r}: an import path must look like package.module:factory")
    elif not _NAME.match(name):
        raise SpecError(f"backend {text!r}: not a backend name")
    return BackendRef(text, name, options)


def registered_factories(extra: Optional[Mapping[str, Factory]] = None) -> Dict[str, Factory]:
    """Built-ins, then entry points, then ``extra`` (from the pluggy hook); later wins."""
    factories: Dict[str, Factory] = {name: b.factory for name, b in BUILTINS.items()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        factories[ep.name] = ep.value
    for name, factory in (extra or {}).items():
        if ":" in name:
            raise SpecError(f"registered backend name {name!r} must not contain ':'")
        factories[name] = factory
    return factories


def _resolve(path: str) -> Callable[..., Any]:
    module_name, _, attribute = path.partition(":")
    # As uvicorn does for "module:app": an in-house module beside the user is importable. The
    # directory is on sys.path for this import only, not for the rest of the session.
    here = os.getcwd()
    added = here not in sys.path
    if added:
        sys.path.append(here)
    try:
        with captured(BackendUnavailable) as caught:  # a vendor module may exit() when its library is missing
            target: Any = importlib.import_module(module_name)
            for part in attribute.split("."):
                target = getattr(target, part)
    finally:
        if added and here in sys.path:
            sys.path.remove(here)
    if caught.error is not None:
        raise BackendLoadError(f"importing {path} raised {type(caught.error).__name__}: {caught.error}") \
            from caught.error
    return target


def backend_kind(backend: Any) -> str:
    """"runtime" for a whole-model RuntimeBackend, else "cache" (a KVBackend)."""
    return "runtime" if hasattr(backend, "open_runtime") and not hasattr(backend, "open_cache") else "cache"


def _construct(label: str, factory: Factory, options: Mapping[str, Any]) -> Backend:
    target = _resolve(factory) if isinstance(factory, str) else factory
    try:
        inspect.signature(target).bind(**options)
    except TypeError as exc:
        raise SpecError(f"backend {label!r} does not take these options: {exc}{_accepted(target)}") from None
    except ValueError:  # no signature to inspect (some builtins): let the call decide
        pass
    with captured(BackendUnavailable, SpecError) as caught:
        backend = target(**options)
    if caught.error is not None:
        raise BackendLoadError(f"backend {label!r} factory raised {type(caught.error).__name__}: {caught.error}") \
            from caught.error
    wanted = _RUNTIME_METHODS if backend_kind(backend) == "runtime" else _KV_METHODS
    missing = [attr for attr in wanted if not hasattr(backend, attr)]
    if missing:
        protocol = "RuntimeBackend" if wanted is _RUNTIME_METHODS else "KVBackend"
        raise BackendLoadError(
            f"backend {label!r} factory returned {type(backend).__name__}, "
            f"which is not a {protocol} (missing: {', '.join(missing)})"
        )
    return backend


def _accepted(factory: Factory) -> str:
    """"; accepted keys: a, b" for a factory's keyword options, or "" when they cannot be listed."""
    try:
        target = _resolve(factory) if isinstance(factory, str) else factory
        parameters = inspect.signature(target).parameters.values()
    except Exception:
        return ""
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in parameters if p.kind in kinds]
    return f"; accepted keys: {', '.join(names)}" if names else "; it takes no options"


def _alias_members(kind: str) -> list:
    """(name, builtin, preset options) of every built-in an alias tries, in order: those of its
    device kind, then those that ALIAS_MEMBERS puts on it with options."""
    members = [(name, b, {}) for name, b in BUILTINS.items() if b.device_kind == kind]
    members += [(name, BUILTINS[name], dict(preset)) for name, preset in ALIAS_MEMBERS.get(kind, ())]
    return members


def _load_alias(kind: str, options: Mapping[str, Any]) -> Backend:
    """The first member of the alias that is available and takes the options. Options meant
    for one member (npu[shape=...] is RKLLM's) make another one a non-candidate, not an error;
    only options no member takes are a usage error."""
    reasons, rejected = [], 0
    members = _alias_members(kind)
    for name, builtin, preset in members:
        label = name if not preset else f"{name}[{','.join(f'{k}={v}' for k, v in preset.items())}]"
        try:
            return _construct(label, builtin.factory, {**preset, **options})
        except BackendUnavailable as exc:
            reasons.append(f"{label}: {exc}")
        except SpecError as exc:  # the options do not bind to this member's factory
            reasons.append(f"{label}: {exc}")
            rejected += 1
    if members and rejected == len(members):
        raise SpecError("; ".join(reasons))
    detail = "; ".join(reasons) if reasons else "none is built in"
    raise BackendUnavailable(f"no {kind} backend is available ({detail})")


def check_backend_name(text: str, extra: Optional[Mapping[str, Factory]] = None,
                       factories: Optional[Mapping[str, Factory]] = None) -> BackendRef:
    """Parse and check that the name is known, without constructing anything."""
    factories = registered_factories(extra) if factories is None else factories
    try:
        ref = parse_backend(text)
    except SpecError as exc:  # a malformed option of a known backend: say which keys it takes
        name = text.strip().partition("[")[0].strip()
        known = factories.get(name) or (name if _IMPORT_PATH.match(name) else None)
        raise SpecError(f"{exc}{_accepted(known) if known else ''}") from None
    if ref.is_import_path or ref.name in ALIASES:
        return ref
    if ref.name not in factories:
        known = ", ".join(sorted(set(factories) | set(ALIASES)))
        raise SpecError(
            f"unknown backend {ref.name!r}; known: {known}; or give package.module:factory"
        )
    return ref


def load_backend(text: str, extra: Optional[Mapping[str, Factory]] = None) -> Backend:
    """Construct the backend named by ``text``: a KVBackend or a RuntimeBackend.

    Raises SpecError for a malformed or unknown name, BackendUnavailable when it
    cannot run here, BackendLoadError when its module or factory raises.
    """
    factories = registered_factories(extra)
    ref = check_backend_name(text, factories=factories)
    if ref.is_import_path:
        return _construct(ref.text, ref.name, ref.options)
    if ref.name in ALIASES:
        return _load_alias(ALIASES[ref.name], ref.options)
    return _construct(ref.text, factories[ref.name], ref.options)


def declared_kind(text: str) -> Optional[str]:
    """The kind ("cache" or "runtime") a built-in name or alias declares, without constructing
    it; None when the name does not say (an import path, a third-party name, a mixed alias)."""
    try:
        name = parse_backend(text).name
    except SpecError:
        return None
    if name in BUILTINS:
        return BUILTINS[name].kind
    if name in ALIASES:
        kinds = {b.kind for _, b, _ in _alias_members(ALIASES[name])}
        return kinds.pop() if len(kinds) == 1 else None
    return None


def alias_first_kind(text: str) -> Optional[str]:
    """The kind of an alias's first choice ("cpu": numpy, a cache; "npu": rkllm, a runtime);
    None when ``text`` is not an alias."""
    try:
        name = parse_backend(text).name
    except SpecError:
        return None
    members = _alias_members(ALIASES[name]) if name in ALIASES else []
    return members[0][1].kind if members else None
