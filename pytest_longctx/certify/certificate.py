"""The certificate: one run's claim, cases, figures, environment and verdict, as data.

Pure model, no pytest: the report plugin fills it from test reports on the
controller, the renderers and the merge command read it back. Its JSON form
follows a published, versioned schema (``schema/certificate-1.json``); a
reader checks ``schema_version`` before anything else.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, Dict, List, Optional

from ..questions import QUESTIONS

SCHEMA_ID = "pytest-longctx/certificate"
SCHEMA_VERSION = 1
SCHEMA_FILE = os.path.join(os.path.dirname(__file__), "schema", f"certificate-{SCHEMA_VERSION}.json")

CERTIFIED, NOT_CERTIFIED, INCOMPLETE = "certified", "not certified", "incomplete"
PACKAGES = ("pytest-longctx", "pytest", "pluggy", "pytest-xdist", "numpy", "psutil", "tabulate", "matplotlib",
            "onnxruntime", "cupy-cuda12x")


class CertificateError(ValueError):
    """A certificate that cannot be read or combined; one line."""


@dataclass
class Case:
    """One test of the matrix: what it checked, how it ended, what it measured."""

    nodeid: str
    question: str = ""
    backend: str = ""
    kv_dtype: str = ""
    positions: Optional[int] = None
    params: Dict[str, Any] = field(default_factory=dict)
    outcome: str = "not run"  # passed, failed, error, skipped, xfailed, xpassed
    message: str = ""
    duration_s: float = 0.0
    figures: List[Dict[str, Any]] = field(default_factory=list)
    rerun: str = ""
    seed: Optional[int] = None
    host: str = ""
    worker: str = ""
    device: str = ""

    @property
    def verdict(self) -> str:
        """pass, fail or not judged: an expected failure that failed is not a defect of the claim."""
        if self.outcome in ("passed", "xfailed"):
            return "pass"
        if self.outcome in ("failed", "error", "xpassed"):
            return "fail"
        return "not judged"


def question_of(nodeid: str) -> str:
    """The question a case certifies, from its module, where no marker can be read (a
    pytest-xdist controller sees node ids only): ``test_limits.py`` and
    ``test_runtime_limits.py`` → limits. Where the item is at hand its ``longctx_*`` marker
    decides (report.question_of_item)."""
    module = os.path.basename(nodeid.split("::", 1)[0])
    for question in QUESTIONS:
        if module in (f"test_{question}.py", f"test_runtime_{question}.py"):
            return question
    return "other"


def verdict_of(cases: List[Case], interrupted: bool, collect_errors: int,
               unfinished: Optional[str] = None, exitstatus: int = 0) -> Dict[str, Any]:
    """certified / not certified / incomplete, with the reasons.

    Any failing case means not certified (a defect seen is seen, even in an
    interrupted run); otherwise an interrupted run, a run that has not finished
    (a checkpoint: ``unfinished`` names the case running when it was written),
    a collection error, no case at all, or a case that was skipped or never ran
    leaves it incomplete. A certificate never says certified when pytest's exit status is
    not 0: pytest counted a failure the cases do not show (a crash outside any case) makes it
    not certified, any other non-zero status incomplete.
    """
    reasons = []
    failing = [c for c in cases if c.verdict == "fail"]
    unjudged = [c for c in cases if c.verdict == "not judged"]
    if failing:
        reasons.append(f"{len(failing)} of {len(cases)} cases failed")
    if unfinished:
        reasons.append(f"the run did not finish: this certificate was written when {unfinished} started "
                       "(a crash or a hang in the backend ends a run without --longctx-isolate)")
    if interrupted:
        reasons.append("the run was interrupted")
    if collect_errors:
        reasons.append(f"{collect_errors} collection errors")
    if not cases:
        reasons.append("no case of the suite ran")
    if unjudged:
        reasons.append(f"{len(unjudged)} of {len(cases)} cases were skipped or did not run")
    unseen_failure = not failing and exitstatus == 1  # pytest.ExitCode.TESTS_FAILED
    if unseen_failure:
        reasons.append("pytest reported a failure that no case of the certificate shows (exit status 1)")
    elif exitstatus not in (0, 1) and not unfinished and not interrupted:
        reasons.append(f"pytest ended with exit status {exitstatus}")
    if failing or unseen_failure:
        verdict = NOT_CERTIFIED
    elif reasons:
        verdict = INCOMPLETE
    else:
        verdict = CERTIFIED
        expected = sum(c.outcome == "xfailed" for c in cases)
        reasons.append(f"{len(cases) - expected} cases passed, {expected} failed as the profile expects"
                       if expected else f"all {len(cases)} cases passed")
    return {"verdict": verdict, "reasons": reasons,
            "complete": not interrupted and not collect_errors and not unfinished}


def counts(cases: List[Case]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for c in cases:
        out[c.outcome] = out.get(c.outcome, 0) + 1
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- environment


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> Optional[int]:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # pragma: no cover - psutil is a dependency
        return None


@functools.lru_cache(maxsize=None)
def package_versions() -> Dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@functools.lru_cache(maxsize=None)
def git_revision(path: Optional[str] = None) -> Dict[str, Any]:
    """The suite's git revision when it runs from a checkout; null fields when installed."""
    path = path or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        rev = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return {"revision": None, "dirty": None}
        status = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        return {"revision": rev.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}


def host_environment() -> Dict[str, Any]:
    return {
        "host": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "packages": dict(package_versions()),
    }


def backend_environment(text: str, backend: Any, error: Optional[BaseException]) -> Dict[str, Any]:
    """What a backend says about its device, driver and runtime (``info()``)."""
    if error is not None or backend is None:
        return {"backend": text, "available": False, "error": f"{type(error).__name__}: {error}"}
    info = backend.info()
    return {
        "backend": text, "available": True, "name": info.name, "device_kind": info.device_kind,
        "device_name": info.device_name, "vendor": info.vendor, "versions": dict(info.versions),
        "kv_dtypes": list(info.kv_dtypes), "max_positions": info.max_positions,
    }


# ----------------------------------------------------------------------------- the document


def plain(value: Any) -> Any:
    """JSON-safe data: tuples as lists, dataclasses as dicts, NaN/Inf as strings (JSON has none)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    item = getattr(value, "item", None)
    return plain(item()) if callable(item) else str(value)


def settings_dict(settings: Any) -> Dict[str, Any]:
    data = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name != "shape"}
    # "applies": false when no case was sized by it (whole-model runtimes carry their
    # model's geometry with each figure), so a reader does not take it for the model's.
    data["shape"] = {"text": settings.shape_text, "described": settings.shape.describe(),
                     "spec": plain(settings.shape), "applies": settings.shape_applies()}
    return plain(data)


def build(*, settings: Any, profile: Optional[Dict[str, Any]], cases: List[Case], environment: Dict[str, Any],
          interrupted: bool, collect_errors: int, started: float, finished: float, exitstatus: int,
          coverage: Dict[str, Any], unfinished: Optional[str] = None,
          context: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    """The certificate as the JSON document the schema describes (``unfinished``: a checkpoint
    written while that case runs; ``context``: the context finder's searches, when it ran)."""
    verdict = verdict_of(cases, interrupted, collect_errors, unfinished, 0 if unfinished else exitstatus)
    if context is not None:
        context = [checked_context(search, cases) for search in context]
        verdict["reasons"] += [f"{search['backend']}: {search['line']}" for search in context]
    from .. import __version__

    return plain({
        "schema": SCHEMA_ID,
        "schema_version": SCHEMA_VERSION,
        "verdict": verdict["verdict"],
        "reasons": verdict["reasons"],
        "complete": verdict["complete"],
        "interrupted": interrupted,
        "exit_status": int(exitstatus),
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(finished - started, 3),
        "suite": {"package": "pytest-longctx", "version": __version__, **dict(git_revision()),
                  "command": " ".join(sys.argv)},
        "profile": profile,
        "settings": settings_dict(settings),
        "environment": environment,
        "counts": counts(cases),
        "coverage": coverage,
        "cases": [dataclasses.asdict(c) | {"verdict": c.verdict} for c in cases],
        "context": context,
    })


def checked_context(search: Dict[str, Any], cases: List[Case]) -> Dict[str, Any]:
    """A search as the certificate may state it: its certified length stands only where cases of
    that backend ran at that length and every one of them passed, so the certificate never
    claims more than was run (a search stopped early, a report lost)."""
    certified = search.get("certified_positions")
    if certified is None:
        return search
    there = [c for c in cases if c.backend == search["backend"] and c.positions == certified]
    if there and all(c.verdict == "pass" for c in there):
        return search
    why = "no case ran there" if not there else "not every case there passed"
    line = f"certified context: none (the search's {certified} is withdrawn: {why})"
    return dict(search, certified_positions=None, line=line)


def load(path: str) -> Dict[str, Any]:
    """Read a certificate, refusing other documents and other schema versions in one line."""
    try:
        with open(path) as handle:
            data = json.load(handle)
    except OSError as exc:
        raise CertificateError(f"{path}: {exc.strerror}") from None
    except ValueError as exc:
        raise CertificateError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_ID:
        got = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise CertificateError(f"{path}: schema={got!r}, but should be {SCHEMA_ID!r}")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise CertificateError(f"{path}: schema_version={data.get('schema_version')!r}, "
                               f"but should be {SCHEMA_VERSION}")
    return data


def schema() -> Dict[str, Any]:
    with open(SCHEMA_FILE) as handle:
        return json.load(handle)


def write_json(path: str, document: Dict[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(document, handle, indent=1, allow_nan=False)
        handle.write("\n")
