"""Markdown and self-contained HTML of a certificate or a merged matrix.

Both are drawn from one list of sections (title, lines, tables), so the two
formats say the same thing; HTML adds the plots (inline SVG, no network,
nothing beside the page) when matplotlib is installed, and says so when not.
"""

from __future__ import annotations

import html as _html
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..questions import QUESTIONS
from ..session.terminal import geometry_line
from . import plots

Table = Tuple[List[str], List[List[str]]]
PLOTS_MISSING = "Plots need matplotlib: pip install 'pytest-longctx[report]'."


@dataclass
class Section:
    title: str
    lines: List[str] = field(default_factory=list)
    tables: List[Table] = field(default_factory=list)
    plots: bool = False
    svgs: List[Tuple[str, str]] = field(default_factory=list)  # (name, svg) drawn for this section only


def _fmt_bytes(n: Optional[int]) -> str:
    return "" if not n else f"{n / (1 << 30):.1f} GiB"


def figure_table(figures: List[Dict[str, Any]], label_keys: Tuple[str, ...] = ("backend", "kv_dtype")) -> Table:
    """Rows (label…, check) × positions columns, as the terminal table; failures marked FAIL."""
    positions = sorted({r["positions"] for r in figures if isinstance(r.get("positions"), int)})
    rows: Dict[Tuple[str, ...], Dict[Any, str]] = {}
    for r in figures:
        key = tuple(str(r.get(k, "")) for k in label_keys) + (r["check"],)
        rows.setdefault(key, {})[r.get("positions")] = r.get("cell", "") + ("" if r.get("passed", True) else " FAIL")
    headers = [k.replace("_", " ") for k in label_keys] + ["check"] + [str(p) for p in positions]
    return headers, [[*key, *(cells.get(p, "") for p in positions)] for key, cells in rows.items()]


def _claim(doc: Dict[str, Any]) -> Section:
    s, profile = doc["settings"], doc.get("profile")
    lines = []
    if profile:
        lines.append(f"Profile **{profile['name']}** ({profile['path']})" + (f": {profile['claim']}" if profile.get("claim") else ""))
        if profile.get("source"):
            lines.append(f"Source of the claim: {profile['source']}")
    bars = ["memory_allowance", "error_factor", "fill_floor", "retrieve_floor", "attention_floor",
            "prefill_fraction_floor", "read_fraction_floor", "attention_fraction_floor", "chunk", "repeats"]
    if s.get("model"):  # a whole-model runtime's run: its model file and the bars that judge it
        bars = ["model", "context", "reference_logits", "memory_allowance", "consistency_kl",
                "logits_kl", "top1_agreement", "prefill_floor", "decode_floor", "chunk", "repeats"]
    rows = [["backends", ", ".join(s["backends"])],
            ["shape", f"{s['shape']['text']} ({s['shape']['described']})"],
            ["positions", ", ".join(map(str, s["positions"]))],
            ["kv dtypes", ", ".join(s["kv_dtypes"]) if s.get("kv_dtypes") else "as claimed by the backend"],
            ["seed", str(s["seed"])]]
    rows += [[b.replace("_", " "), str(s[b])] for b in bars if s.get(b) is not None]
    tables = [(["setting", "value"], rows)]
    if profile and profile.get("expected_failures"):
        tables.append((["expected failure (test id or prefix)", "reason"],
                       [[x["id"], x["reason"]] for x in profile["expected_failures"]]))
    return Section("Claim and bars", lines, tables)


def _environment(doc: Dict[str, Any]) -> Section:
    e = doc["environment"]
    rows = [["host", e.get("host", "")], ["os", e.get("os", "")], ["cpu", f"{e.get('cpu', '')} ({e.get('cpu_count')} cores)"],
            ["memory", _fmt_bytes(e.get("memory_bytes"))], ["python", e.get("python", "")],
            ["packages", ", ".join(f"{k} {v}" for k, v in e.get("packages", {}).items())],
            ["workers", ", ".join(e.get("workers", []))]]
    suite = doc["suite"]
    rows.append(["suite", f"pytest-longctx {suite['version']}, git {suite.get('revision') or 'not a checkout'}"
                 + (" (modified)" if suite.get("dirty") else "")])
    backend_rows = []
    for b in e.get("backends", []):
        if b.get("available"):
            backend_rows.append([b["backend"], f"{b['device_kind']} {b.get('device_name', '')}".strip(),
                                 b.get("vendor", ""), ", ".join(f"{k} {v}" for k, v in b.get("versions", {}).items()),
                                 ", ".join(b.get("kv_dtypes", []))])
        else:
            backend_rows.append([b["backend"], "unavailable", "", b.get("error", ""), ""])
    return Section("Environment", [], [(["", ""], rows),
                                       (["backend", "device", "vendor", "driver / runtime versions", "kv dtypes"],
                                        backend_rows)])


def _question_order(question: str) -> Tuple[int, str]:
    """The questions in their own order (limits, memory, throughput, equivalence), others after."""
    order = list(QUESTIONS)
    return (order.index(question) if question in order else len(order), question)


def _cases(doc: Dict[str, Any]) -> Section:
    """Counts per question, then every case that did not pass (cases come sorted by question, then
    case id, from certificate_sections)."""
    cases = doc["cases"]
    outcomes = sorted({c["outcome"] for c in cases})
    questions = sorted({c["question"] for c in cases}, key=_question_order)
    count_rows = [[q, *(str(sum(1 for c in cases if c["question"] == q and c["outcome"] == o)) for o in outcomes)]
                  for q in questions]
    tables = [(["question", *outcomes], count_rows)]
    notable = [c for c in cases if c["outcome"] not in ("passed",)]
    if notable:
        tables.append((["case", "outcome", "message"],
                       [[c["nodeid"], c["outcome"], (c["message"] or "").strip().splitlines()[0][:300]
                         if c["message"] else ""] for c in notable]))
    reruns = sorted({c["rerun"] for c in cases if c.get("rerun")})
    lines = ["Rerun a failed case alone: `" + r + "`" for r in reruns[:20]]
    return Section("Cases", lines, tables)


def _coverage(doc: Dict[str, Any]) -> Section:
    tables, lines = [], []
    for backend, cov in doc.get("coverage", {}).items():
        rows = [[dim, ", ".join(f"{value}: {status}" for value, status in values.items())]
                for dim, values in cov["dimensions"].items()]
        tables.append(([f"{backend}: dimension", "value: status"], rows))
        lines.append(f"{backend}: {cov['exercised']} of {cov['total']} values exercised.")
        lines += [f"{backend}: {note}." for note in cov.get("notes", [])]
    return Section("Coverage: what was and was not exercised", lines, tables)


def _figures(doc: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every figure with its case's host and device; labelled by them when a run spans several."""
    figures = [dict(f, host=c["host"], device=c["device"]) for c in doc["cases"] for f in c["figures"]]
    if len({(f["device"], f["host"]) for f in figures}) > 1:
        figures = [dict(f, label=f"{f['backend']} on {f['device']} @ {f['host']} {f['kv_dtype']}") for f in figures]
    return figures


def certificate_sections(doc: Dict[str, Any]) -> Tuple[str, List[Section]]:
    """The certificate's sections, its cases read by question and then case id: a stable order
    whatever order they finished in (xdist workers finish them out of order)."""
    title = f"pytest-longctx certificate: {doc['verdict']}"
    doc = dict(doc, cases=sorted(doc["cases"], key=lambda c: (_question_order(c["question"]), c["nodeid"])))
    head = Section("Verdict", [f"**{doc['verdict']}**: " + "; ".join(doc["reasons"]) + ".",
                               f"Started {doc['started']}, {doc['duration_s']:.1f} s; "
                               f"{', '.join(f'{v} {k}' for k, v in doc['counts'].items())}."
                               + (" The run was interrupted." if doc.get("interrupted") else "")])
    figures = _figures(doc)
    places = {(f["device"], f["host"]) for f in figures}
    keys = ("backend", "device", "host", "kv_dtype") if len(places) > 1 else ("backend", "kv_dtype")
    shape = doc["settings"]["shape"]
    measured = Section("Measured figures", [geometry_line(shape["text"], shape["described"], doc["settings"]["seed"], figures)],
                       [figure_table(figures, keys)] if figures else [], plots=bool(figures))
    sections = [head, _claim(doc), measured, _cases(doc), _coverage(doc), _environment(doc)]
    if doc.get("context"):
        sections.insert(1, _context(doc["context"]))
    return title, sections


def _context(context: List[Dict[str, Any]]) -> Section:
    """The context finder's answer per backend, and every probe it made."""
    lines = [f"`{s['backend']}`: {s['line']}; {len(s['probes'])} probes in {s['seconds']:.1f} s"
             + (f"; {s['maximum_note']}" if s.get("maximum_note") else "") for s in context]
    rows = [[s["backend"], str(p["positions"]), "passed" if p["passed"] else "failed", f"{p['seconds']:.2f}",
             str(p["cases"]), p["reason"]] for s in context for p in s["probes"]]
    svg = plots.context_plot(context)
    return Section("Certified context", lines,
                   [(["backend", "positions", "probe", "seconds", "cases", "first failing case"], rows)],
                   svgs=[("context", svg)] if svg else [])


def matrix_sections(doc: Dict[str, Any]) -> Tuple[str, List[Section]]:
    title = "pytest-longctx matrix"
    rows = [[c["source"], c["host"], ", ".join(c["devices"]), c["verdict"], c.get("profile") or "",
             c["shape"], c["started"]] for c in doc["certificates"]]
    head = Section("Certificates", [], [(["file", "host", "backend on device", "verdict", "profile", "shape",
                                          "started"], rows)])
    figures = doc["figures"]
    table = figure_table(figures, ("column", "shape", "kv_dtype"))
    sections = [head, Section("Backend × device × check × positions", [], [table], plots=bool(figures))]
    searches = [dict(s, backend=f"{c['source']}: {s['backend']}") for c in doc["certificates"]
                for s in c.get("context") or ()]
    if searches:
        sections.insert(1, _context(searches))
    return title, sections


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown(title: str, sections: List[Section]) -> str:
    out = [f"# {title}", ""]
    for section in sections:
        out += [f"## {section.title}", ""]
        for line in section.lines:
            out += [line, ""]
        for headers, rows in section.tables:
            out.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
            out.append("|" + "---|" * len(headers))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("")
    return "\n".join(out)


def markdown(doc: Dict[str, Any]) -> str:
    return _markdown(*(matrix_sections(doc) if doc.get("schema", "").endswith("matrix") else certificate_sections(doc)))


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:12.5px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}tr:nth-child(even) td{background:#fafafa}
td.fail{color:#b00020;font-weight:600}.verdict{font-size:18px;padding:8px 12px;display:inline-block;border-radius:4px}
.certified{background:#e6f4ea;color:#137333}.not-certified{background:#fce8e6;color:#b00020}.incomplete{background:#fef7e0;color:#8a6100}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:12px}.plot{border:1px solid #eee;padding:4px;margin:0}.plot svg{width:100%;height:auto}
code{background:#f4f4f4;padding:1px 4px}
"""


def _inline(text: str) -> str:
    """Escape, then the two Markdown marks the sections use: **bold** and `code`."""
    import re

    text = _html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _html_page(title: str, sections: List[Section], figures: List[Dict[str, Any]], verdict: str = "") -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{_html.escape(title)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{_html.escape(title)}</h1>"]
    if verdict:
        out.append(f'<p class="verdict {verdict.replace(" ", "-")}" id="verdict">{_html.escape(verdict)}</p>')
    for section in sections:
        out.append(f"<section><h2>{_html.escape(section.title)}</h2>")
        out += [f"<p>{_inline(line)}</p>" for line in section.lines]
        if section.plots:
            drawn = plots.all_plots(figures)
            if drawn:
                out.append('<div class="plots">')
                out += [f'<figure class="plot" id="plot-{name}">{svg}</figure>' for name, svg in drawn]
                out.append("</div>")
            else:
                out.append(f'<p class="no-plots">{_html.escape(PLOTS_MISSING)}</p>')
        if section.svgs:
            out.append('<div class="plots">')
            out += [f'<figure class="plot" id="plot-{name}">{svg}</figure>' for name, svg in section.svgs]
            out.append("</div>")
        for headers, rows in section.tables:
            out.append("<table><thead><tr>" + "".join(f"<th>{_html.escape(str(h))}</th>" for h in headers)
                       + "</tr></thead><tbody>")
            for row in rows:
                cells = "".join(
                    f'<td class="fail">{_html.escape(str(c))}</td>' if str(c).endswith(" FAIL") or c in ("failed", "error")
                    else f"<td>{_html.escape(str(c))}</td>" for c in row)
                out.append(f"<tr>{cells}</tr>")
            out.append("</tbody></table>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def html(doc: Dict[str, Any]) -> str:
    if doc.get("schema", "").endswith("matrix"):
        title, sections = matrix_sections(doc)
        shapes = len({f["shape"] for f in doc["figures"]}) > 1
        figures = [dict(f, label=f"{f['column']}{' ' + f['shape'] if shapes else ''} {f['kv_dtype']}")
                   for f in doc["figures"]]
        return _html_page(title, sections, figures)
    title, sections = certificate_sections(doc)
    return _html_page(title, sections, _figures(doc), doc["verdict"])
