"""Hooks for third parties, added to pytest's plugin manager by ``pytest_addhooks``.

Implement them in a conftest.py or in a plugin registered through ``pytest11``.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping


def pytest_longctx_backends() -> Mapping[str, Any]:
    """Register backends by name.

    Return a mapping of backend name to factory: a callable taking the
    backend's options as keyword arguments and returning a KVBackend, or a
    ``"package.module:factory"`` string. Names must not contain ``:``. Called
    once per run, at configuration; every implementation's mapping is merged,
    later registrations winning over earlier ones and over built-ins.

    Packages can register the same way without pytest through the entry-point
    group ``pytest_longctx.backends``.
    """


def pytest_longctx_record(config: Any, nodeid: str, record: Dict[str, Any]) -> None:
    """A figure was measured (on the controller, also under pytest-xdist).

    ``record`` is plain data: backend, kv_dtype, positions, check, value, unit,
    bound, passed and a formatted cell. Called in test order as reports
    arrive, before the terminal summary.
    """


def pytest_longctx_certificate(config: Any, certificate: Dict[str, Any]) -> None:
    """The certificate is complete and about to be written (on the controller, once).

    ``certificate`` is the JSON document of the published schema; a plugin may
    add fields (keep them under a key of its own name: the schema allows extra
    top-level keys) or read it. Called in ``pytest_sessionfinish``, after
    Ctrl-C too, before the JSON, Markdown and HTML files are written.
    """


def pytest_longctx_context(config: Any, search: Dict[str, Any]) -> None:
    """A ``--longctx-find-context`` search of one backend has ended (on the controller).

    ``search`` is plain data, as the certificate's ``context`` field holds it: backend,
    step, maximum, certified_positions, first_failure, every probe and the seconds taken.
    """
