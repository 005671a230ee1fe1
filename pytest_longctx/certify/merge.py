"""Merging certificates from several machines into one matrix (backend x device x check x
positions), and writing a document in the formats its paths ask for. ``longctx-report``
(``tools.report``) is the command over it.

The matrix has one column per backend on a device of a host. Certificates of another
schema version, or two that hold the same case (same node id and shape on the same host
and device), are refused with a one-line ``CertificateError``: a matrix must not silently
mix formats or count a case twice.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence

from . import render
from .certificate import CertificateError, load, plain, write_json

MATRIX_ID = "pytest-longctx/matrix"
MATRIX_VERSION = 1


def column(case: Dict[str, Any], host: str) -> str:
    device = case.get("device") or "unknown device"
    return f"{case.get('backend') or '?'} on {device} @ {case.get('host') or host}"


def merge(paths: Sequence[str]) -> Dict[str, Any]:
    """One matrix document from certificates; CertificateError on a version clash or a case seen twice."""
    seen: Dict[tuple, str] = {}
    certificates, figures, cases = [], [], []
    for path in paths:
        doc = load(path)
        host = doc["environment"].get("host", "")
        shape = doc["settings"]["shape"]["text"]
        source = os.path.basename(path)
        columns = []
        for case in doc["cases"]:
            label = column(case, host)
            key = (case.get("host") or host, case.get("device"), shape, case["nodeid"])
            if key in seen:
                raise CertificateError(f"case {case['nodeid']} on {label} (shape {shape}) is in {seen[key]} and {path}, "
                                       "but should be in one certificate only")
            seen[key] = path
            if label not in columns:
                columns.append(label)
            cases.append({"column": label, "source": source, "nodeid": case["nodeid"], "outcome": case["outcome"],
                          "verdict": case["verdict"], "question": case["question"]})
            figures += [dict(f, column=label, source=source, shape=shape) for f in case["figures"]]
        certificates.append({
            "source": source, "path": os.path.abspath(path), "host": host, "devices": columns,
            "verdict": doc["verdict"], "reasons": doc["reasons"],
            "profile": (doc.get("profile") or {}).get("name"), "shape": doc["settings"]["shape"]["text"],
            "started": doc["started"], "revision": doc["suite"].get("revision"),
            "context": doc.get("context"),  # the context finder's searches, when it ran
        })
    return plain({"schema": MATRIX_ID, "schema_version": MATRIX_VERSION, "certificates": certificates,
                  "figures": figures, "cases": cases})


def write(document: Dict[str, Any], outputs: Sequence[str]) -> List[str]:
    written = []
    for path in outputs:
        kind = os.path.splitext(path)[1].lower()
        if kind == ".json":
            write_json(path, document)
        elif kind == ".md":
            with open(path, "w") as handle:
                handle.write(render.markdown(document))
        elif kind in (".html", ".htm"):
            with open(path, "w") as handle:
                handle.write(render.html(document))
        else:
            raise CertificateError(f"output={path}, but should end in .json, .md or .html")
        written.append(path)
    return written
