"""Finding and constructing backends: ``load_backend`` works outside pytest too.

A backend is named three ways: a built-in (or a device-kind alias of one), a
name registered by a third-party package (entry-point group
``pytest_longctx.backends`` or the ``pytest_longctx_backends`` hook), or an
import path ``package.module:factory``. Any of them takes options as
``NAME[key=value,...]``. Registered names never contain ``:``.

Built-ins are entry points of this project's own distribution (pyproject.toml),
found exactly as a third party's are: nothing here lists them, and the plugin
never imports ``pytest_longctx.backends`` (the layering test holds that arrow).
A factory joins a device-kind alias (``cpu``, ``gpu``, ``npu``) by declaring
``device_aliases`` (see ``protocol``); resolving it imports its module only,
never its engine.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

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


# Device-kind aliases: the first available registered backend that answers to the kind is used.
ALIASES = ("cpu", "gpu", "npu")
# The distribution whose entry points are the built-ins.
_OWN_DISTRIBUTION = "pytest-longctx"


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _entry_points() -> list:
    """The group's entry points, this project's own (the built-ins) first, each part by name:
    a stable order that does not depend on how distributions happen to be found."""
    found = list(entry_points(group=ENTRY_POINT_GROUP))

    def foreign(ep: Any) -> bool:
        dist = getattr(ep, "dist", None)
        return dist is None or _normalized(dist.name) != _OWN_DISTRIBUTION

    return sorted(found, key=lambda ep: (foreign(ep), ep.name))


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
    """Entry points (the built-ins first), then ``extra`` (from the pluggy hook); later wins."""
    factories: Dict[str, Factory] = {}
    for ep in _entry_points():
        factories.setdefault(ep.name, ep.value)
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


def _factory_kind(target: Any) -> Optional[str]:
    """The kind a backend, or its factory's class, declares by its methods: "runtime" for a
    whole-model RuntimeBackend, "cache" for a KVBackend; None for a plain function."""
    if hasattr(target, "open_runtime") and not hasattr(target, "open_cache"):
        return "runtime"
    return "cache" if hasattr(target, "open_cache") else None


def backend_kind(backend: Any) -> str:
    """"runtime" for a whole-model RuntimeBackend, else "cache" (a KVBackend)."""
    return _factory_kind(backend) or "cache"


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


def _declared_aliases(target: Any) -> Mapping[str, Mapping[str, Any]]:
    """A factory's ``device_aliases`` (see ``protocol``), checked for shape; {} when absent."""
    aliases = getattr(target, "device_aliases", None) or {}
    if not isinstance(aliases, Mapping) or not all(isinstance(v, Mapping) for v in aliases.values()):
        return {}
    return aliases


def _alias_members(kind: str) -> List[Tuple[str, Factory, Dict[str, Any]]]:
    """(label, factory, preset options) of every registered backend that answers to the alias
    ``kind``: those there by default before those that need options to get there ("npu":
    rkllm, then openvino[device=NPU]), each in entry-point order. Resolving a factory imports
    its module, not its engine (the built-ins import theirs when constructed); one that fails
    to import is no member."""
    members = []
    for ep in _entry_points():
        try:
            target = _resolve(ep.value)
        except LongctxError:
            continue
        aliases = _declared_aliases(target)
        if kind in aliases:
            preset = dict(aliases[kind])
            label = ep.name if not preset else f"{ep.name}[{','.join(f'{k}={v}' for k, v in preset.items())}]"
            members.append((label, target, preset))
    return sorted(members, key=lambda member: bool(member[2]))


def _load_alias(kind: str, options: Mapping[str, Any]) -> Backend:
    """The first member of the alias that is available and takes the options. Options meant
    for one member (npu[shape=...] is RKLLM's) make another one a non-candidate, not an error;
    only options no member takes are a usage error."""
    reasons, rejected = [], 0
    members = _alias_members(kind)
    for label, factory, preset in members:
        try:
            return _construct(label, factory, {**preset, **options})
        except BackendUnavailable as exc:
            reasons.append(f"{label}: {exc}")
        except SpecError as exc:  # the options do not bind to this member's factory
            reasons.append(f"{label}: {exc}")
            rejected += 1
    if members and rejected == len(members):
        raise SpecError("; ".join(reasons))
    detail = "; ".join(reasons) if reasons else "none is installed"
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
        return _load_alias(ref.name, ref.options)
    return _construct(ref.text, factories[ref.name], ref.options)


def declared_kind(text: str) -> Optional[str]:
    """The kind ("cache" or "runtime") an entry-point name or alias declares, without constructing
    it; None when it does not say (an import path, a name only the hook registers, a function
    factory, a mixed alias)."""
    try:
        name = parse_backend(text).name
    except SpecError:
        return None
    if name in ALIASES:
        kinds = {_factory_kind(factory) for _, factory, _ in _alias_members(name)}
        return kinds.pop() if len(kinds) == 1 else None
    factory = registered_factories().get(name)
    if factory is None:
        return None
    try:
        target = _resolve(factory) if isinstance(factory, str) else factory
    except LongctxError:  # loading it will say why, in the case that needs it
        return None
    return _factory_kind(target)


def alias_first_kind(text: str) -> Optional[str]:
    """The kind of an alias's first choice ("cpu": numpy, a cache; "npu": rkllm, a runtime);
    None when ``text`` is not an alias."""
    try:
        name = parse_backend(text).name
    except SpecError:
        return None
    members = _alias_members(name) if name in ALIASES else []
    return _factory_kind(members[0][1]) if members else None
