"""Plots of a certificate's figures as inline SVG, where people would rather look than read.

Optional: needs matplotlib (the ``report`` extra); ``available()`` says
whether plots can be drawn, and every function returns SVG text. The
Figure API is used without pyplot, so no global backend is switched.
"""

from __future__ import annotations

import io
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

Series = Dict[str, List[Tuple[int, Dict[str, Any]]]]


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def series(figures: List[Dict[str, Any]], check: str) -> Series:
    """Figures of one check by series label (``label``, else backend and kv dtype), sorted by positions."""
    out: Series = {}
    for record in figures:
        if record.get("check") != check or not isinstance(record.get("positions"), int):
            continue
        label = record.get("label") or f"{record.get('backend')} {record.get('kv_dtype')}".strip()
        out.setdefault(label, []).append((record["positions"], record))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in sorted(out.items())}


def _figure(title: str, ylabel: str, log_base: Optional[int] = 10) -> Tuple[Any, Any]:
    """One axes, positions on a log2 x axis; the y axis logarithmic unless ``log_base`` is None
    (rates, errors and sizes span decades)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.6, 3.4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("positions")
    ax.set_ylabel(ylabel)
    ax.set_xscale("log", base=2)
    if log_base is not None:
        ax.set_yscale("log", base=log_base)
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def _svg(fig: Any, ax: Any, ticks: List[int]) -> str:
    if ticks:
        ax.set_xticks(sorted(set(ticks)))
        ax.set_xticklabels([str(t) for t in sorted(set(ticks))])
        ax.minorticks_off()
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one entry per label: floors repeat per series
    if len(unique) <= 16 and max(map(len, unique)) <= 48:
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:  # a merged matrix: many long labels go below the axes, and the figure grows to hold them
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.2))
        fig.set_size_inches(7.6, 3.8 + 0.18 * len(unique))
    out = io.StringIO()
    fig.savefig(out, format="svg")
    text = out.getvalue()
    return text[text.index("<svg"):]


def _number(value: Any) -> float:
    """A figure's value as a float a plot can take: the certificate keeps NaN and Infinity as
    strings (JSON has none), which are drawn as gaps (the table marks them as failures)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return number if math.isfinite(number) else float("nan")


def _color(ax: Any, i: int) -> str:
    return f"C{i % 10}"


# A whole-model runtime's figures (conformance/test_runtime_*.py): positions are prompt depths.
RUNTIME_MEMORY, RUNTIME_PREFILL, RUNTIME_DECODE = "peak memory growth / analytic KV", "prefill", "decode"


def memory_plot(figures: List[Dict[str, Any]]) -> Optional[str]:
    """Measured KV memory against positions, with the analytic size and the allowed bound; a
    runtime's peak growth over each stretch of depth, against the analytic KV of the stretch."""
    data = {**series(figures, "KV memory / analytic"),
            **{f"{label} (growth per stretch)": points for label, points in series(figures, RUNTIME_MEMORY).items()}}
    if not data:
        return None
    fig, ax = _figure("KV memory vs positions", "GiB", log_base=2)
    ticks = []
    for i, (label, points) in enumerate(data.items()):
        xs = [p for p, _ in points]
        ticks += xs
        gib = 1 << 30
        ax.plot(xs, [r.get("measured_bytes", 0) / gib for _, r in points], "o-", color=_color(ax, i),
                label=f"{label} measured")
        ax.plot(xs, [r.get("analytic_bytes", 0) / gib for _, r in points], "--", color=_color(ax, i),
                label=f"{label} analytic kv_bytes(N)")
        ax.plot(xs, [r.get("bound_bytes", 0) / gib for _, r in points], ":", color=_color(ax, i),
                label=f"{label} allowed bound")
    return _svg(fig, ax, ticks)


def fill_plot(figures: List[Dict[str, Any]]) -> Optional[str]:
    """Prefill and decode fill positions/s, with the copy-bandwidth roofline and the floor."""
    prefill, decode = series(figures, "prefill fill"), series(figures, "decode fill")
    if not prefill and not decode:
        return None
    fig, ax = _figure("fill throughput vs positions", "positions/s")
    ticks = []
    for i, label in enumerate(sorted(set(prefill) | set(decode))):
        for name, data, style in (("prefill", prefill, "o-"), ("decode", decode, "s-")):
            points = data.get(label, [])
            if not points:
                continue
            xs = [p for p, _ in points]
            ticks += xs
            ax.plot(xs, [_number(r["value"]) for _, r in points], style, color=_color(ax, i),
                    label=f"{label} {name} fill")
        points = prefill.get(label) or decode.get(label) or []
        _roofline_and_floor(ax, i, label, points, ("copy_gbps", "bytes_per_position", "copy"), "fill floor")
    return _svg(fig, ax, ticks)


def _roofline_and_floor(ax: Any, i: int, label: str, points: List[Any], roofline: Tuple[str, str, str],
                        floor_label: str) -> None:
    """The rate the bandwidth allows (bandwidth / bytes per unit) dashed, the floor dotted."""
    gbps, per_unit, name = roofline
    roof = [(p, r[gbps] * 1e9 / r[per_unit]) for p, r in points if r.get(gbps) and r.get(per_unit)]
    if roof:
        ax.plot([p for p, _ in roof], [v for _, v in roof], "--", color=_color(ax, i),
                label=f"{label} {name}-bandwidth roofline")
    floors = [(p, r["threshold"]) for p, r in points if r.get("threshold")]
    if floors:
        ax.plot([p for p, _ in floors], [v for _, v in floors], ":", color="gray", label=floor_label)


def _measured(ax: Any, data: Dict[str, List[Any]], value: Callable[[Dict[str, Any]], float], name: str,
              beside: Callable[[int, str, List[Any]], None]) -> List[Any]:
    """Each label's measured points as a line ("LABEL NAME"), then ``beside`` for what is drawn
    next to it (roofline, bound); returns the positions, for the ticks."""
    ticks: List[Any] = []
    for i, (label, points) in enumerate(data.items()):
        xs = [p for p, _ in points]
        ticks += xs
        ax.plot(xs, [value(r) for _, r in points], "o-", color=_color(ax, i), label=f"{label} {name}")
        beside(i, label, points)
    return ticks


def attention_plot(figures: List[Dict[str, Any]]) -> Optional[str]:
    """Decode attention tokens/s (one query through all layers) with the read-bandwidth roofline."""
    data = series(figures, "decode attention")
    if not data:
        return None
    fig, ax = _figure("decode attention vs positions", "tokens/s")
    ticks = _measured(ax, data, lambda r: _number(r["value"]), "measured", lambda i, label, points: (
        _roofline_and_floor(ax, i, label, points, ("read_gbps", "kv_bytes", "read"), "attention floor")))
    return _svg(fig, ax, ticks)


def error_plot(figures: List[Dict[str, Any]]) -> Optional[str]:
    """Attention error against the float64 reference, with the error each case allowed."""
    data = series(figures, "attention error")
    if not data:
        return None
    fig, ax = _figure("attention error vs positions", "max |error|")

    def allowed(i: int, label: str, points: List[Any]) -> None:
        bounds = [(p, r["threshold"]) for p, r in points if r.get("threshold")]
        if bounds:
            ax.plot([p for p, _ in bounds], [v for _, v in bounds], "--", color=_color(ax, i),
                    label=f"{label} allowed")

    ticks = _measured(ax, data, lambda r: max(_number(r["value"]), 1e-30), "error", allowed)
    return _svg(fig, ax, ticks)


def runtime_rate_plot(figures: List[Dict[str, Any]]) -> Optional[str]:
    """A runtime's prefill positions/s and decode tokens/s at each prompt depth: a cost that
    grows faster than linear with the context shows as a falling curve."""
    prefill, decode = series(figures, RUNTIME_PREFILL), series(figures, RUNTIME_DECODE)
    if not prefill and not decode:
        return None
    fig, ax = _figure("runtime prefill and decode vs depth", "positions/s, tokens/s")
    ticks: List[int] = []
    for i, label in enumerate(sorted(set(prefill) | set(decode))):
        for name, data, style in (("prefill positions/s", prefill, "o-"), ("decode tokens/s", decode, "s-")):
            points = data.get(label, [])
            if points:
                xs = [p for p, _ in points]
                ticks += xs
                ax.plot(xs, [_number(r["value"]) for _, r in points], style, color=_color(ax, i),
                        label=f"{label} {name}")
    return _svg(fig, ax, ticks)


def context_plot(context: List[Dict[str, Any]]) -> Optional[str]:
    """The context finder's probes: seconds per probe against length, passes and failures marked,
    the certified context and the first failure as vertical lines. None without matplotlib."""
    if not available() or not any(search.get("probes") for search in context or ()):
        return None
    fig, ax = _figure("context finder: probes against length", "seconds per probe", log_base=None)
    ticks: List[int] = []
    for i, search in enumerate(context):
        probes = sorted(search.get("probes") or (), key=lambda p: p["positions"])
        color = _color(ax, i)
        for passed, marker in ((True, "o"), (False, "x")):
            points = [p for p in probes if p["passed"] is passed]
            if points:
                ax.plot([p["positions"] for p in points], [max(p["seconds"], 1e-3) for p in points], marker,
                        color=color, label=f"{search['backend']} {'passed' if passed else 'failed'}")
        if search.get("certified_positions"):
            ax.axvline(search["certified_positions"], color=color, linestyle="--",
                       label=f"{search['backend']} certified {search['certified_positions']}")
        failure = search.get("first_failure")
        if failure:
            ax.axvline(failure["positions"], color=color, linestyle=":",
                       label=f"{search['backend']} first failure {failure['positions']}")
        ticks += [p["positions"] for p in probes]
    return _svg(fig, ax, ticks)


PLOTS = (("memory", memory_plot), ("fill", fill_plot), ("attention", attention_plot), ("error", error_plot),
         ("runtime", runtime_rate_plot))


def all_plots(figures: List[Dict[str, Any]]) -> List[Tuple[str, str]]:
    """(name, svg) for every plot the figures allow; empty without matplotlib."""
    if not available():
        return []
    out = []
    for name, plot in PLOTS:
        svg = plot(figures)
        if svg:
            out.append((name, svg))
    return out
