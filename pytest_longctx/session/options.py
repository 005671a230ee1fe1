"""Command-line options, their ini mirrors, markers, the run's settings and header.

Every option ``--longctx-NAME`` has an ini key ``longctx_NAME``. A profile
(``--longctx-profile``) states a claim's values too; precedence is command line
> profile > ini > default. The settings are built once in ``pytest_configure``
and kept in the config's stash; a malformed value stops the run with a
one-line usage error.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import pytest

from .. import hookspec
from ..access.registry import check_backend_name
from ..errors import SpecError
from ..questions import QUESTIONS
from ..shapes import DEFAULT_SHAPE, parse_shape
from .profile import Profile, load_profile, resolve_profile
from .settings import DEFAULT_POSITIONS, Settings, parse_kv_dtypes, parse_length, parse_positions

SUITE = "pytest_longctx.conformance"  # run by path when no test path is given

settings_key = pytest.StashKey[Settings]()
profile_key = pytest.StashKey[Optional[Profile]]()
factories_key = pytest.StashKey[Dict[str, Any]]()

MARKERS = {
    **{f"longctx_{question}": line for question, line in QUESTIONS.items()},
    "longctx_longest_only": "a probe whose pass at the longest length implies its pass at the shorter ones "
    "(a length where a bug starts): run at the run's longest length only, at every length under "
    "--longctx-find-context",
    "longctx_storage_independent": "the check does not depend on the KV storage type: run it at the "
    "backend's most precise kv dtype only",
    "longctx_other_kind": "internal: a case for the other kind of backend (KV cache or whole-model "
    "runtime), deselected at collection",
}


@dataclass(frozen=True)
class _Option:
    name: str
    help: str
    default: Any
    parse: Callable[[str], Any] = str
    metavar: str = "VALUE"
    ini_type: str = "string"
    flag: bool = False  # takes no value on the command line: --longctx-NAME means "true"


def parse_bool(text: Any) -> bool:
    """An ini or profile value (``true``, ``1``, ``yes``; ``false``, ``0``, ``no``) as a bool."""
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError("should be true or false")


def parse_seed(text: str) -> int:
    """A seed is a non-negative integer, as NumPy's generators take it."""
    seed = int(text)
    if seed < 0:
        raise ValueError("should be a non-negative integer")
    return seed


def usage_error(option: str, value: Any, why: str) -> pytest.UsageError:
    """The one shape of every malformed option: ``longctx: --longctx-NAME=VALUE: why``."""
    return pytest.UsageError(f"longctx: --longctx-{option}={value}: {why}")


def parse_deadline(text: str) -> Any:
    """``auto``, ``none``/``off``/0 (no deadline) or seconds."""
    if str(text).strip().lower() == "auto":
        return "auto"
    return parse_optional(float)(text)


def parse_optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``none`` or ``off`` (or 0, for a limit) switches the check off: None."""
    def parsed(text: str) -> Any:
        if str(text).strip().lower() in ("none", "off"):
            return None
        return parse(text) or None
    return parsed


OPTIONS = (
    _Option("shape", f"model shape: a preset, a TOML/JSON file or key=value,... (default {DEFAULT_SHAPE})",
            DEFAULT_SHAPE, metavar="SHAPE"),
    _Option("positions", "comma-separated positions to certify, up to 131072 (default 4096,8192,16384)",
            ",".join(map(str, DEFAULT_POSITIONS)), metavar="N,N,..."),
    _Option("kv-dtype", "narrow the KV dtypes to these (default: every dtype the backend claims)",
            None, metavar="DTYPE,..."),
    _Option("seed", "seed of every input; printed in the header so a run can be reproduced",
            None, parse_seed, metavar="SEED"),
    _Option("chunk", "positions per append in prefill-style fill (default 512)", 512, int, metavar="N"),
    _Option("repeats", "timed repeats per throughput figure (default 5)", 5, int, metavar="N"),
    _Option("memory-allowance", "fraction measured KV memory may exceed the analytic size (default 0.10)",
            0.10, float, metavar="FRACTION"),
    _Option("error-factor", "equivalence: backend error <= factor x plain float32 error + floor (default 3)",
            3.0, float, metavar="K"),
    _Option("fill-floor", "minimum fill rate in positions/s at 16384 positions, scaled by positions/16384 (default 125)",
            125.0, float, metavar="RATE"),
    _Option("retrieve-floor", "minimum retrieve rate in ops/s at 16384 positions, scaled by positions/16384 (default 1250)",
            1250.0, float, metavar="RATE"),
    _Option("attention-floor", "minimum decode attention rate in tokens/s (one query through all layers) at 16384 positions, scaled by 16384/positions (default none)",
            None, float, metavar="RATE"),
    _Option("prefill-fraction-floor", "minimum prefill-style fill traffic as a fraction of the probed copy "
            "bandwidth, e.g. 0.3 (default none)", None, float, metavar="FRACTION"),
    _Option("read-fraction-floor", "minimum whole-layer read as a fraction of the probed copy bandwidth "
            "(default none)", None, float, metavar="FRACTION"),
    _Option("attention-fraction-floor", "minimum decode attention traffic as a fraction of the probed "
            "streaming-read bandwidth (default none)", None, float, metavar="FRACTION"),
    _Option("model", "model file a whole-model runtime backend loads (rkllm, llamacpp; "
                     "a model directory for transformers)", None, metavar="PATH"),
    _Option("context", "context a runtime is asked to hold (default: the model's own limit)", None, int,
            metavar="N"),
    _Option("reference-logits", "golden logits of the same model and tokens, written by longctx-logits "
            "from a float reference run", None, metavar="FILE"),
    _Option("logits-kl", "runtimes: mean KL divergence (nats) from the reference logits, at most "
            "(default 0.05)", 0.05, float, metavar="NATS"),
    _Option("top1-agreement", "runtimes: share of positions whose top-1 token agrees with the reference "
            "logits, at least (default 0.9)", 0.9, float, metavar="FRACTION"),
    _Option("consistency-kl", "runtimes: one-shot vs chunked vs after-reset logits may differ by this KL "
            "divergence in nats, same top-1 (default: 10 x the noise measured for the runtime's KV dtype)",
            None, parse_optional(float), metavar="NATS"),
    _Option("prefill-floor", "runtimes: minimum prefill rate in positions/s at every depth (default none)",
            None, float, metavar="RATE"),
    _Option("decode-floor", "runtimes: minimum decode rate in tokens/s at every depth (default none)",
            None, float, metavar="RATE"),
    _Option("contended-cores", "a rate floor missed while other processes used at least this many cores "
            "is reported, not judged (default 0.5; none or 0: always judged)", 0.5, parse_optional(float),
            metavar="CORES"),
    _Option("deadline", "seconds a case may take at 16384 positions, scaled by positions (at least a quarter); "
            "a case past it fails with 'no answer in N s'; a backend that hung is not asked again in the run "
            "(default auto: from the case's KV bytes and the host's measured copy bandwidth, at least 60 s; "
            "none: no deadline)", "auto", parse_deadline, metavar="SECONDS"),
    _Option("isolate", "run every case in a forked child process, so that a crash or a hang in native code "
            "fails that case and the run goes on (POSIX)", False, parse_bool, ini_type="bool", flag=True),
    _Option("repeat-speedup", "a repeated attend input may be answered at most this many times faster than "
            "fresh ones, else the backend caches answers (MLPerf TEST04; default 3; none: not judged)",
            3.0, parse_optional(float), metavar="RATIO"),
    _Option("find-context", "search the position axis for the largest context at which every selected "
            "group passes (doubling, then bisection), and the first failure above it", False, parse_bool,
            ini_type="bool", flag=True),
    _Option("context-step", "granularity of --longctx-find-context in positions: a positive multiple of "
            "the backend's position granularity (default 1024)", 1024, int, metavar="N"),
    _Option("max-positions", "the largest context --longctx-find-context tries (default: the backend's "
            "claimed maximum, else 131072), cut to what the memory preflight says fits", None, parse_length,
            metavar="N"),
)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspec)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("longctx", "long-context backend conformance")
    group.addoption(
        "--longctx-backend", action="append", dest="longctx_backend", default=None, metavar="NAME",
        help="backend to certify: a name (cpu, gpu, npu, numpy, ...), NAME[key=value,...] or "
        "package.module:factory; repeat for a matrix",
    )
    parser.addini("longctx_backend", "backends to certify, as --longctx-backend", type="args", default=[])
    group.addoption("--longctx-profile", dest="longctx_profile", default=None, metavar="FILE",
                    help="a TOML profile stating the claim: backend, shape, positions, kv dtypes, bars and "
                    "expected failures (a path or a shipped profile's name); the command line wins over it")
    parser.addini("longctx_profile", "profile, as --longctx-profile", type="string", default=None)
    for opt in OPTIONS:
        dest = "longctx_" + opt.name.replace("-", "_")
        how = dict(action="store_const", const="true") if opt.flag else dict(metavar=opt.metavar)
        group.addoption(f"--longctx-{opt.name}", dest=dest, default=None, help=opt.help, **how)
        parser.addini(dest, opt.help, type=opt.ini_type, default=None)


def _value(config: pytest.Config, opt: _Option, profile: Optional[Profile]) -> Any:
    dest = "longctx_" + opt.name.replace("-", "_")
    raw = config.getoption(dest)
    if raw is None and profile is not None:
        raw = profile.options.get(opt.name)
    if raw is None:
        raw = config.getini(dest)
    if raw is None or raw == "":
        return opt.default
    try:
        return opt.parse(raw)
    except (ValueError, SpecError) as exc:
        raise usage_error(opt.name, repr(raw), str(exc)) from None


def _profile(config: pytest.Config) -> Optional[Profile]:
    sent = getattr(config, "workerinput", {}).get("longctx_profile")
    text = config.getoption("longctx_profile") or config.getini("longctx_profile")
    if not text:
        return None
    try:
        if sent is not None:  # a worker, maybe on another host: the controller's profile
            return load_profile(sent["path"], sent["text"])
        return load_profile(os.path.abspath(resolve_profile(text)))
    except SpecError as exc:
        raise pytest.UsageError(f"longctx: {exc}") from None


def _settings(config: pytest.Config, factories: Dict[str, Any], profile: Optional[Profile]) -> Settings:
    values = {opt.name: _value(config, opt, profile) for opt in OPTIONS}
    backends = (config.getoption("longctx_backend") or (profile.backends if profile else ())
                or config.getini("longctx_backend") or ["cpu"])
    try:
        for text in backends:
            check_backend_name(text, factories)
        shape = parse_shape(values["shape"])
        positions = parse_positions(values["positions"])
        kv_dtypes = parse_kv_dtypes(values["kv-dtype"]) if values["kv-dtype"] else None
    except SpecError as exc:
        raise pytest.UsageError(f"longctx: {exc}") from None
    workerinput = getattr(config, "workerinput", None)
    seed = values["seed"]
    if workerinput is not None and "longctx_seed" in workerinput:
        seed = workerinput["longctx_seed"]
    elif seed is None:
        seed = secrets.randbits(32)
    for name in ("chunk", "repeats", "context", "context-step"):
        if values[name] is not None and values[name] < 1:
            raise usage_error(name, values[name], "should be >= 1")
    for name in ("memory-allowance", "error-factor", "fill-floor", "retrieve-floor", "attention-floor",
                 "prefill-fraction-floor", "read-fraction-floor", "attention-fraction-floor",
                 "logits-kl", "top1-agreement", "consistency-kl", "prefill-floor", "decode-floor",
                 "deadline", "repeat-speedup", "contended-cores"):
        if values[name] is not None and values[name] != "auto" and not values[name] >= 0:
            raise usage_error(name, values[name], "should be >= 0")
    if values["repeat-speedup"] is not None and values["repeat-speedup"] < 1:
        raise usage_error("repeat-speedup", values["repeat-speedup"], "should be >= 1")
    if values["isolate"] and not hasattr(os, "fork"):
        raise pytest.UsageError("longctx: --longctx-isolate: needs os.fork (POSIX), which this platform lacks")
    # Every other option is a Settings field of the same name (dashes for underscores).
    fields = {opt.name.replace("-", "_"): values[opt.name] for opt in OPTIONS if opt.name not in _PARSED_APART}
    fields.update(model=_absolute(values["model"]), reference_logits=_absolute(values["reference-logits"]))
    return Settings(backends=tuple(backends), shape_text=values["shape"], shape=shape, positions=positions,
                    seed=seed, kv_dtypes=kv_dtypes, **fields)


_PARSED_APART = ("shape", "positions", "kv-dtype", "seed")


def _absolute(path: Optional[str]) -> Optional[str]:
    """Absolute, so xdist workers and rerun commands name the same file. A missing file is not a
    usage error: the cases that need it fail naming the path, and the rest of the run goes on."""
    return None if path is None else os.path.abspath(path)


def _conformance_dir() -> str:
    """The installed suite's folder, found without importing it: the plugin runs the suite's
    files as pytest's arguments and never imports the suite as code (the layering test)."""
    spec = importlib.util.find_spec(SUITE)
    if spec is None or not spec.submodule_search_locations:
        raise pytest.UsageError(f"longctx: the conformance suite {SUITE} is not installed")
    return list(spec.submodule_search_locations)[0]


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    factories: Dict[str, Any] = {}
    for mapping in config.hook.pytest_longctx_backends():
        factories.update(mapping or {})
    config.stash[factories_key] = factories
    profile = config.stash[profile_key] = _profile(config)
    config.stash[settings_key] = _settings(config, factories, profile)
    # `pytest --longctx-backend=X` (or a profile) with no path runs the installed conformance suite,
    # and only it, wherever it starts: also in a directory whose ini names testpaths (a checkout).
    chosen = config.getoption("longctx_backend") or config.getoption("longctx_profile")
    if chosen and config.args_source != pytest.Config.ArgsSource.ARGS:
        config.args[:] = [_conformance_dir()]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist: every worker draws its inputs from the controller's seed and reads its profile."""
    node.workerinput["longctx_seed"] = node.config.stash[settings_key].seed
    profile = node.config.stash.get(profile_key, None)
    if profile is not None:
        node.workerinput["longctx_profile"] = {"path": profile.path, "text": profile.text}
