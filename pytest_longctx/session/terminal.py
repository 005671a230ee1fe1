"""The terminal summary: a table of backend × check × positions, and rerun commands.

Figures travel as plain data in each report's ``user_properties``, so the
controller sees every worker's under pytest-xdist; only the controller prints.
"""

from __future__ import annotations

import os
import shlex
from typing import Any, Dict, List, Optional, Tuple

import pytest
from tabulate import tabulate

from .fixtures import get_state, records_of
from .options import profile_key, settings_key

RERUN_KEY = "longctx_rerun"


class SummaryCollector:
    """Registered as a plugin on the controller; holds what the reports carried."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.records: List[Dict[str, Any]] = []
        self.reruns: List[str] = []
        self._seen: Dict[str, int] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Each phase's report carries the item's properties so far (setup ⊆ call ⊆ teardown):
        # take only the records this report adds, so each figure is seen once.
        records = records_of(report)
        new, self._seen[report.nodeid] = records[self._seen.get(report.nodeid, 0):], len(records)
        for record in new:
            self.records.append(record)
            self.config.hook.pytest_longctx_record(config=self.config, nodeid=report.nodeid, record=record)
        if report.failed:
            self.reruns.extend(value for key, value in report.user_properties if key == RERUN_KEY)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.records:
            settings = self.config.stash[settings_key]
            terminalreporter.write_sep("=", "longctx figures")
            terminalreporter.write_line(geometry_line(settings.shape_text, settings.shape.describe(),
                                                      settings.seed, self.records))
            terminalreporter.write_line(self.table())
        if self.reruns:
            terminalreporter.write_sep("-", "longctx: rerun a failed case alone")
            for command in dict.fromkeys(self.reruns):
                terminalreporter.write_line(command)

    def table(self) -> str:
        positions = sorted({r["positions"] for r in self.records if isinstance(r["positions"], int)})
        rows: Dict[Tuple[str, str, str], Dict[Any, str]] = {}
        for record in self.records:
            key = (record["backend"], record["kv_dtype"], record["check"])
            mark = "" if record["passed"] else " NOT JUDGED" if record.get("judged") is False else " FAIL"
            rows.setdefault(key, {})[record["positions"]] = record["cell"] + mark
        extra = sorted({p for cells in rows.values() for p in cells} - set(positions), key=str)
        columns = positions + extra
        body = [[*key, *(cells.get(p, "") for p in columns)] for key, cells in rows.items()]
        headers = ["backend", "kv dtype", "check", *(str(p) if p != "" else "other" for p in columns)]
        return tabulate(body, headers=headers, tablefmt="simple")


def geometry_line(shape_text: str, described: str, seed: Any, figures: List[Dict[str, Any]]) -> str:
    """What the figures were measured on: the run's shape for KV-cache figures, each model's
    own geometry (its runtime's kv_spec, carried as ``geometry``) for whole-model figures."""
    parts = [f"shape {shape_text} ({described})"] if any(not f.get("geometry") for f in figures) else []
    models = dict.fromkeys((f.get("model") or "model", f["geometry"]) for f in figures if f.get("geometry"))
    parts += [f"model {model} ({geometry})" for model, geometry in models]
    return ", ".join(parts + [f"seed {seed}"])


def pytest_configure(config: pytest.Config) -> None:
    # Only the controller summarises; workers send their reports to it.
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(SummaryCollector(config), "longctx-summary")


def _device(config: pytest.Config, text: str) -> str:
    loaded = get_state(config).load(text)
    if loaded.error is not None:
        return f"{text} (unavailable: {loaded.error})"
    info = loaded.backend.info()
    name = f" {info.device_name}" if info.device_name else ""
    return f"{text} on {info.device_kind}{name}"


def pytest_report_header(config: pytest.Config) -> Optional[List[str]]:
    """One line naming backend, device, shape, positions and seed, when the suite is in use."""
    settings = config.stash.get(settings_key, None)
    profile = config.stash.get(profile_key, None)
    if settings is None or not (config.getoption("longctx_backend") or config.getini("longctx_backend") or profile):
        return None
    positions = ",".join(map(str, settings.positions))
    if settings.find_context:  # the lengths are the search's (finder.py says which, below)
        positions = "searched by --longctx-find-context"
    dtypes = ",".join(settings.kv_dtypes) if settings.kv_dtypes else "as claimed"
    backends = ", ".join(_device(config, text) for text in settings.backends)
    geometry = []
    if settings.shape_applies():
        geometry.append(f"shape {settings.shape_text} ({settings.shape.describe()})")
    if settings.model is not None:
        geometry.append(f"model {settings.model} (geometry read from it)")
    where = " | ".join(geometry or ["model none given"])
    return [
        f"longctx: backend {backends} | {where} | "
        f"positions {positions} | kv {dtypes} | seed {settings.seed}" + (f" | profile {profile.name}" if profile else "")
    ]


def rerun_command(item: pytest.Item) -> str:
    """The one-line command that reruns this case alone, with the same inputs."""
    settings = item.config.stash[settings_key]
    params = getattr(getattr(item, "callspec", None), "params", {})
    options = settings.rerun_options(
        params.get("longctx_backend", settings.backends[0]),
        params.get("longctx_kv_dtype"),
        params.get("longctx_positions"),
        runtime="longctx_runtime" in getattr(item, "fixturenames", ()),
    )
    # Node ids are relative to the rootdir, which is not where the user stands when the
    # plugin ran the installed suite: name the file from the invocation directory.
    here = item.config.invocation_params.dir
    path = os.path.relpath(item.path, here) if item.path.is_relative_to(here) else str(item.path)
    name = item.nodeid.split("::", 1)[1] if "::" in item.nodeid else item.name
    return f"pytest {shlex.quote(f'{path}::{name}')} {options}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    report = yield
    params = getattr(getattr(item, "callspec", None), "params", {})
    if report.failed and "longctx_backend" in params:
        command = rerun_command(item)
        report.sections.append(("longctx rerun", command))
        report.user_properties.append((RERUN_KEY, command))
    return report
