"""Profiles: a TOML file that states one claim and the bars it is held to.

A profile names the backend, shape, positions and kv dtypes of a claim (table
``[run]``), the bars (``[bars]``: any bar option, by its option name) and the
cases expected to fail, each with its reason (``[[expected-failure]]``). Values
are what the command line would take, so they are parsed by the same code.
Precedence: command line > profile > ini > defaults: a profile is given for
one run, an ini is the project's standing default, and one run can still
override a profile's value without editing it.

A malformed profile is a usage error naming the file, the line and the key.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..errors import SpecError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

RUN_KEYS = ("backend", "shape", "positions", "kv-dtype", "seed", "chunk", "repeats",
            "model", "context", "reference-logits")
BAR_KEYS = ("memory-allowance", "error-factor", "fill-floor", "retrieve-floor", "attention-floor",
            "prefill-fraction-floor", "read-fraction-floor", "attention-fraction-floor",
            "logits-kl", "top1-agreement", "consistency-kl", "prefill-floor", "decode-floor",
            "deadline", "repeat-speedup")
# Run keys naming a file, taken relative to the profile's own folder.
_PATH_KEYS = ("model", "reference-logits")
ABOUT_KEYS = ("name", "claim", "source", "device")


class ProfileError(SpecError):
    """A profile that cannot be used; the message names file, line and key."""


@dataclass(frozen=True)
class ExpectedFailure:
    """A test id (or prefix of one) the claim says will fail, and why.

    Strict by default: a listed case that passes fails the run. ``strict = false``
    is for a margin that depends on the seed (the case fails for some inputs and
    not others): it is reported as xfailed or xpassed, judged by the same bar.
    """

    id: str
    reason: str
    strict: bool = True

    def matches(self, nodeid: str) -> bool:
        """Prefix match on the node id, or on it with the directory part left out, so one
        profile serves the installed suite (``test_limits.py::...``) and a checkout
        (``conformance/test_limits.py::...``). An id with ``*`` is a glob prefix, so one
        entry can name a case for any backend (``...[*-longrope-*``)."""
        file_part, sep, rest = nodeid.partition("::")
        short = os.path.basename(file_part) + sep + rest
        if "*" in self.id:
            pattern = self.id.replace("[", "[[]") + "*"
            return fnmatch.fnmatchcase(nodeid, pattern) or fnmatch.fnmatchcase(short, pattern)
        return nodeid.startswith(self.id) or short.startswith(self.id)


@dataclass(frozen=True)
class Profile:
    """A parsed profile: option values as text, keyed by option name, plus the claim."""

    path: str
    name: str
    claim: str = ""
    source: str = ""
    device: str = ""
    options: Dict[str, str] = field(default_factory=dict)
    backends: Tuple[str, ...] = ()
    expected_failures: Tuple[ExpectedFailure, ...] = ()
    text: str = ""

    def expected_failure(self, nodeid: str) -> Optional[ExpectedFailure]:
        return next((x for x in self.expected_failures if x.matches(nodeid)), None)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "path": self.path, "name": self.name, "claim": self.claim, "source": self.source,
            "device": self.device, "backends": list(self.backends), "options": dict(self.options),
            "expected_failures": [{"id": x.id, "reason": x.reason, "strict": x.strict}
                                  for x in self.expected_failures],
        }


def _line_of(text: str, table: str, key: Optional[str] = None, index: int = 0) -> int:
    """Line number (1-based) of ``key`` in ``[table]`` (the index-th ``[[table]]``), or of the header."""
    header = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    current, seen, found_header = "", -1, 0
    for number, line in enumerate(text.splitlines(), 1):
        match = header.match(line)
        if match:
            current = match.group(1).strip().strip('"')
            if current == table:
                seen += 1
                if seen == index:
                    found_header = number
            continue
        if key is not None and current == table and seen == index:
            if re.match(rf'^\s*["\']?{re.escape(key)}["\']?\s*=', line):
                return number
    if key is not None and table == "":
        return _line_of(text, "", None) or 1
    return found_header or 1


def _text(value: Any) -> str:
    """A TOML value as the command line would give it: lists joined by commas."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        raise TypeError("a boolean")
    return str(value)


def load_profile(path: str, text: Optional[str] = None) -> Profile:
    """Read and check a profile; every problem is a ProfileError of one line.

    ``text`` is the file's content when it is already known (a pytest-xdist
    worker on another host gets the controller's profile as text).
    """
    if text is None:
        try:
            with open(path, "rb") as handle:
                text = handle.read().decode()
        except OSError as exc:
            raise ProfileError(f"profile={path}: {exc.strerror}, but should be a readable TOML file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile {path}: {exc}") from None

    def bad(table: str, key: Optional[str], got: Any, expected: str, index: int = 0) -> ProfileError:
        line = _line_of(text, table, key, index)
        name = f"{table}.{key}" if key and table else (key or table)
        return ProfileError(f"profile {path} line {line}: {name}={got!r}, but should be {expected}")

    known_tables = ("profile", "run", "bars", "expected-failure")
    for table, value in data.items():
        if table not in known_tables:
            raise bad("", table, value if not isinstance(value, dict) else "[...]",
                      f"one of the tables {', '.join(known_tables)}")
    about = data.get("profile", {})
    for key, value in about.items():
        if key not in ABOUT_KEYS:
            raise bad("profile", key, value, f"one of {', '.join(ABOUT_KEYS)}")
        if not isinstance(value, str):
            raise bad("profile", key, value, "a string")
    options: Dict[str, str] = {}
    backends: Tuple[str, ...] = ()
    for table, allowed in (("run", RUN_KEYS), ("bars", BAR_KEYS)):
        values = data.get(table, {})
        if not isinstance(values, dict):
            raise bad(table, None, values, "a table")
        for raw_key, value in values.items():
            key = raw_key.replace("_", "-")
            if key == "kv-dtypes":
                key = "kv-dtype"
            if key not in allowed:
                raise bad(table, raw_key, value, f"one of {', '.join(allowed)}")
            if key == "backend":
                items = value if isinstance(value, list) else [value]
                if not items or not all(isinstance(v, str) and v for v in items):
                    raise bad(table, raw_key, value, "a backend name or a list of them")
                backends = tuple(items)
                continue
            if table == "bars" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise bad(table, raw_key, value, "a number")
            try:
                options[key] = _text(value)
            except TypeError:
                raise bad(table, raw_key, value, "a number, a string or a list") from None
            relative_file = key in _PATH_KEYS or (key == "shape" and options[key].endswith((".toml", ".json")))
            if relative_file and not os.path.isabs(os.path.expanduser(options[key])):
                options[key] = os.path.join(os.path.dirname(os.path.abspath(path)), options[key])
    failures: List[ExpectedFailure] = []
    entries = data.get("expected-failure", [])
    if not isinstance(entries, list):
        raise bad("expected-failure", None, entries, "an array of tables [[expected-failure]]")
    for index, entry in enumerate(entries):
        for key in entry:
            if key not in ("id", "reason", "strict"):
                raise bad("expected-failure", key, entry[key], "id, reason or strict", index)
        for key in ("id", "reason"):
            value = entry.get(key)
            if not isinstance(value, str) or not value.strip():
                raise bad("expected-failure", key, value, "a non-empty string", index)
        strict = entry.get("strict", True)
        if not isinstance(strict, bool):
            raise bad("expected-failure", "strict", strict, "true or false", index)
        failures.append(ExpectedFailure(entry["id"].strip(), entry["reason"].strip(), strict))
    name = about.get("name") or os.path.splitext(os.path.basename(path))[0]
    return Profile(path=path, name=name, claim=about.get("claim", ""),
                   source=about.get("source", ""), device=about.get("device", ""), options=options,
                   backends=backends, expected_failures=tuple(failures), text=text)


def shipped_profiles() -> Dict[str, str]:
    """The profiles shipped with the package, by name (``--longctx-profile=NAME`` finds them)."""
    here = os.path.join(os.path.dirname(__file__), "profiles")
    if not os.path.isdir(here):
        return {}
    return {os.path.splitext(f)[0]: os.path.join(here, f) for f in sorted(os.listdir(here)) if f.endswith(".toml")}


def resolve_profile(text: str) -> str:
    """A path, or the name of a shipped profile."""
    if os.path.exists(text) or text.endswith(".toml"):
        return text
    shipped = shipped_profiles()
    if text in shipped:
        return shipped[text]
    raise ProfileError(f"profile={text!r}, but should be a TOML file or a shipped profile "
                       f"({', '.join(shipped) or 'none'})")
