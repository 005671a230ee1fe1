"""``longctx-report``: combine certificates from several machines into one matrix, or re-render one.

    longctx-report merge A.json B.json ... -o matrix.json matrix.md matrix.html
    longctx-report render cert.json -o cert.html

A refused certificate (another schema version, a case counted twice) is one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..certify.certificate import CertificateError, load
from ..certify.merge import merge, write


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
