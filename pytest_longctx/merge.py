"""``longctx-report``: combine certificates from several machines into one matrix, or re-render one.

    longctx-report merge A.json B.json ... -o matrix.json matrix.md matrix.html
    longctx-report render cert.json -o cert.html

The matrix is backend × device × check × positions: one column per backend on
a device of a host. Certificates of another schema version, or two that hold
the same case (same node id and shape on the same host and device), are refused with a
one-line error and exit status 2: a matrix must not silently mix formats or
count a case twice.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="longctx-report", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    m = commands.add_parser("merge", help="combine certificates into a backend x device x check x positions matrix")
    m.add_argument("certificates", nargs="+", metavar="CERT.json")
    m.add_argument("-o", "--output", nargs="+", required=True, metavar="OUT",
                   help="matrix files to write: .json, .md, .html (several allowed: -o m.json m.md m.html)")
    r = commands.add_parser("render", help="render one certificate as Markdown or HTML")
    r.add_argument("certificate", metavar="CERT.json")
    r.add_argument("-o", "--output", nargs="+", required=True, metavar="OUT")
    args = parser.parse_args(argv)
    try:
        if args.command == "merge":
            document = merge(args.certificates)
            verdicts = ", ".join(f"{c['source']}: {c['verdict']}" for c in document["certificates"])
            summary = f"{len(document['cases'])} cases from {len(args.certificates)} certificates ({verdicts})"
        else:
            document = load(args.certificate)
            summary = f"{args.certificate}: {document['verdict']}"
        written = write(document, args.output)
    except (CertificateError, OSError) as exc:
        print(f"longctx-report: error: {exc}", file=sys.stderr)
        return 2
    print(f"longctx-report: {summary}; wrote {', '.join(written)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
