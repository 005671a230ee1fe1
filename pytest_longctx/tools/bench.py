"""``longctx-bench``: fill, decode and attention figures per backend and length, as fractions of
the machine's own limits.

Speed targets live here, as printed figures, not in timed unit tests. Every rate is also a
fraction of what this device's memory or arithmetic does, measured in the same run:

- opening a cache (allocation and whatever preparation the backend does) is timed apart, with
  the first prefill chunk after it (the cost a new cache pays), from the steady fill;
- prefill-style fill (chunks through all layers, RoPE applied, timed from the return of
  ``open_cache``): stored KV bytes per second against the one-way rate of a copy between two
  touched 64 MiB buffers;
- decode attention (one query through all layers): stored K and V bytes per second against a
  streaming read;
- prefill attention (a 512-query chunk over the full cache, one layer a call): FLOP/s against
  the measured matrix-multiply rate.

On a host backend the copy and read probes run beside every timed repeat, and a fraction is
the median of each repeat's rate over the probe next to it: a shared machine's bandwidth moves
from one second to the next. A device backend's ``bandwidth()`` is probed once.

    longctx-bench --backend cpu --shape qwen3-0.6b --positions 16384 --kv-dtype float16,float32
    longctx-bench --backend cpu --positions 4096,16384,65536 --json cpu.json
    longctx-bench --markdown cpu.json            # the docs' tables, from the JSON

With one ``--backend`` each case is a table of workloads; with several, one table per case has
a column per backend. Backends run one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO

import numpy as np
from tabulate import tabulate

from .. import __version__
from ..access.registry import load_backend
from ..errors import LongctxError, NotSupported
from ..measure.bandwidth import HostProbe, Roofline, RooflineCache
from ..measure.inputs import Inputs
from ..measure.preflight import cache_preflight
from ..measure.stats import Stats
from ..measure.timer import timed
from ..measure.units import format_bytes
from ..measure.workloads import fill, native_pool, time_retrieve, timed_pool_positions
from ..reference import apply_rope, attention
from ..session.settings import parse_kv_dtypes, parse_positions
from ..shapes import parse_shape
from ..spec import CacheSpec

DECODE_POSITIONS = 128  # decode-style fill at the end of the cache


# --- figures ------------------------------------------------------------------------------


@dataclass
class Figure:
    """One workload's median rate, and its fraction of the limit it is judged against."""

    workload: str
    median: float
    unit: str
    spread: float
    gbps: Optional[float] = None
    fraction: Optional[float] = None
    of: str = ""  # "copy", "read", "matmul"
    floor: Optional[float] = None

    @property
    def passed(self) -> Optional[bool]:
        return None if self.floor is None or self.fraction is None else self.fraction >= self.floor

    def row(self) -> List[str]:
        fraction = f"{self.fraction:.0%} of {self.of}" if self.fraction is not None else ""
        if self.floor is not None and self.fraction is not None:
            fraction += f" ({'ok' if self.passed else 'BELOW'} >= {self.floor:.0%})"
        return [self.workload, f"{self.median:.4g}", self.unit, f"±{self.spread:.0%}",
                "" if self.gbps is None else f"{self.gbps:.2f}", fraction]


@dataclass
class Case:
    """One backend, KV dtype and length: its figures, or why there are none."""

    backend: str
    kv_dtype: str
    positions: int
    kv_bytes: int
    status: str = "ok"  # ok, skipped, not supported, failed
    reason: str = ""
    figures: List[Figure] = field(default_factory=list)
    roofline: Dict[str, Any] = field(default_factory=dict)
    load_average: Optional[List[float]] = None

    def as_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        for figure, data in zip(self.figures, out["figures"]):
            data["passed"] = figure.passed
        return out


def _ratio_median(rates: Sequence[float], limits: Sequence[float]) -> float:
    """Median of each repeat's rate over the limit sampled beside it."""
    return statistics.median(r / max(lim, 1e-12) for r, lim in zip(rates, limits))


def prefill_attention_flops(spec: CacheSpec, length: int, n_q: int) -> int:
    """Multiply-adds x 2 of attention for the last n_q queries of ``length`` positions: QK^T
    and PV over the keys each query sees (causal, and the sliding window when there is one)."""
    positions = np.arange(length - n_q, length, dtype=np.int64)
    visible = positions + 1
    if spec.sliding_window:
        visible = np.minimum(visible, spec.sliding_window)
    return int(4 * spec.n_heads * spec.head_dim * visible.sum())


# --- progress -----------------------------------------------------------------------------


class Progress:
    """One status line on stderr for long runs: rewritten in place on a terminal, a line
    every ``every`` seconds otherwise (a log), nothing when disabled."""

    def __init__(self, enabled: bool, stream: TextIO = sys.stderr, every: float = 10.0) -> None:
        self.enabled = enabled
        self.stream = stream
        self.every = every
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last = time.monotonic()
        self._width = 0

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
            self.stream.flush()
        elif time.monotonic() - self._last >= self.every:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last = time.monotonic()

    def clear(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


# --- the limits ---------------------------------------------------------------------------


class Limits:
    """Where a backend's rooflines come from: sampled host probes, or its device's probes once."""

    def __init__(self, backend: Any, label: str, rooflines: RooflineCache) -> None:
        self._host: Optional[HostProbe] = None
        self._fixed: Optional[Roofline] = None
        if callable(getattr(backend, "bandwidth", None)):
            found = rooflines.bandwidth(label, backend)
            self._fixed = Roofline(found.copy_gbps / 2, found.read_gbps)
            self.method = f"{found.method}; copy counted one way"
        else:
            self._host = HostProbe()
            self.method = self._host.method
        self.matmul_flops, self.matmul_method = rooflines.matmul(label, backend)

    def sample(self) -> Roofline:
        return self._fixed if self._host is None else self._host.sample()

    def close(self) -> None:
        if self._host is not None:
            self._host.close()


# --- one case -----------------------------------------------------------------------------


@dataclass
class Floors:
    fill: Optional[float] = None
    decode: Optional[float] = None
    prefill_attention: Optional[float] = None


def bench_case(backend: Any, label: str, spec: CacheSpec, limits: Limits, repeats: int, chunk: int, seed: int,
               floors: Floors, progress: Progress, reference: bool = False) -> Case:
    """Open a cache of ``spec``, fill it to max_positions and time every workload on it."""
    n = spec.max_positions
    name = f"{label} {spec.kv_dtype} @ {n}"
    case = Case(label, spec.kv_dtype, n, spec.kv_bytes(n))
    inputs = Inputs(seed, f"bench-{spec.kv_dtype}-{n}")
    decode = min(DECODE_POSITIONS, n // 2)
    chunk = max(1, min(chunk, n - decode))
    pool = native_pool(backend, inputs, spec, timed_pool_positions(spec, n, chunk, decode))
    sync = backend.synchronize
    progress.update(f"{name}: opening the cache ({format_bytes(case.kv_bytes)})")
    sync()
    start = time.perf_counter()
    cache = backend.open_cache(spec)
    sync()
    open_seconds = time.perf_counter() - start
    per_position = spec.position_bytes()
    try:
        chunks = -(-(n - decode) // chunk)
        fill_roofs: List[Roofline] = []
        prefill_seconds: List[float] = []

        def prefill_timer(step: Callable[[], None]) -> float:
            progress.update(f"{name}: prefill-style fill, chunk {len(prefill_seconds) + 1}/{chunks}")
            if prefill_seconds:  # the first chunk is timed from the return of open_cache
                fill_roofs.append(limits.sample())
            return timed(step, sync)

        record = fill(cache, pool, range(spec.n_layers), n - decode, chunk, timer=prefill_timer,
                      seconds=prefill_seconds, keep=True)
        decode_seconds: List[float] = []
        if record.error is None:
            progress.update(f"{name}: decode-style fill")
            fill(cache, pool, range(spec.n_layers), decode, 1, timer=lambda step: timed(step, sync),
                 seconds=decode_seconds, keep=True, into=record)
        if record.error:
            raise LongctxError(record.error)
        progress.update(f"{name}: retrieve")
        ops_seconds, layer_seconds = time_retrieve(backend, cache, np.random.default_rng(seed), repeats)
        progress.update(f"{name}: decode attention")
        token_seconds, token_roofs = _decode_attention(backend, cache, inputs, limits, repeats)
        progress.update(f"{name}: prefill attention")
        attend_seconds = _prefill_attention(backend, cache, inputs, repeats, chunk)
        k, v = record.values(backend, 0, 0, n) if reference else (None, None)
    finally:
        cache.close()

    steady = prefill_seconds[1:] or prefill_seconds
    fill_rates = [chunk * per_position / s / 1e9 for s in steady]
    roofs = fill_roofs or [limits.sample()]
    copy_now = statistics.median(r.copy_gbps for r in roofs)
    fill_stats = Stats.of([chunk / s for s in steady])
    decode_fill = Stats.of([1 / s for s in decode_seconds])
    layer_bytes = spec.kv_bytes(n) / spec.n_layers
    layer_gbps = Stats.of([layer_bytes / s / 1e9 for s in layer_seconds]).median
    tokens = Stats.of([1 / s for s in token_seconds])
    token_gbps = [spec.kv_bytes(n) / s / 1e9 for s in token_seconds]
    flops = prefill_attention_flops(spec, n, chunk)
    attend = Stats.of([flops / s / 1e9 for s in attend_seconds])
    case.figures = [
        Figure("open (allocate + prepare)", open_seconds * 1e3, "ms", 0.0, case.kv_bytes / open_seconds / 1e9),
        Figure(f"first prefill chunk after open ({chunk} pos)", prefill_seconds[0] * 1e3, "ms", 0.0,
               chunk * per_position / prefill_seconds[0] / 1e9, chunk * per_position / prefill_seconds[0] / 1e9
               / copy_now, "copy"),
        Figure(f"prefill-style fill ({chunk} pos/chunk)", fill_stats.median, "pos/s", fill_stats.spread,
               statistics.median(fill_rates), _ratio_median(fill_rates, [r.copy_gbps for r in roofs]), "copy",
               floors.fill),
        Figure("decode-style fill", decode_fill.median, "pos/s", decode_fill.spread,
               decode_fill.median * per_position / 1e9, decode_fill.median * per_position / 1e9 / copy_now, "copy"),
        Figure("retrieve (1-position reads)", Stats.of([1 / s for s in ops_seconds]).median, "ops/s",
               Stats.of([1 / s for s in ops_seconds]).spread),
        Figure("layer read, copied out", Stats.of([1 / s for s in layer_seconds]).median, "layers/s",
               Stats.of([1 / s for s in layer_seconds]).spread, layer_gbps, layer_gbps / copy_now, "copy"),
        Figure("decode attention, all layers", tokens.median, "tok/s", tokens.spread, statistics.median(token_gbps),
               _ratio_median(token_gbps, [r.read_gbps for r in token_roofs]), "read", floors.decode),
        Figure(f"prefill attention ({chunk} queries, 1 layer)", attend.median, "GFLOP/s", attend.spread, None,
               attend.median * 1e9 / limits.matmul_flops, "matmul", floors.prefill_attention),
    ]
    if reference:
        took = _reference_decode(spec, inputs, k, v, repeats)
        case.figures.append(Figure("reference decode query, 1 layer (float64)", took.median * 1e3, "ms", took.spread))
    case.roofline = {
        "copy_gbps": copy_now,
        "read_gbps": statistics.median(r.read_gbps for r in token_roofs),
        "matmul_gflops": limits.matmul_flops / 1e9,
        "method": limits.method,
        "matmul_method": limits.matmul_method,
    }
    return case


def _decode_attention(backend: Any, cache: Any, inputs: Inputs, limits: Limits, repeats: int):
    """Seconds per token (one fresh query through every layer) after a warm-up token, each
    with a roofline sampled just before it."""
    spec = cache.spec
    queries = backend.asarray(inputs.q(spec.n_layers * (repeats + 1), spec))
    calls = iter(range(queries.shape[0]))

    def token() -> None:
        for layer in range(spec.n_layers):
            i = next(calls)
            cache.attend(layer, queries[i:i + 1])

    token()
    seconds, roofs = [], []
    for _ in range(repeats):
        roofs.append(limits.sample())
        seconds.append(timed(token, backend.synchronize))
    return seconds, roofs


def _prefill_attention(backend: Any, cache: Any, inputs: Inputs, repeats: int, chunk: int) -> List[float]:
    """Seconds of one attend of ``chunk`` fresh queries (the cache's last positions) over a
    full layer, a different layer each repeat, after a warm-up call."""
    spec = cache.spec
    seconds = []
    for r in range(repeats + 1):
        q = backend.asarray(inputs.q(chunk, spec))
        took = timed(lambda: cache.attend(r % spec.n_layers, q), backend.synchronize)
        if r:
            seconds.append(took)
    return seconds


def _reference_decode(spec: CacheSpec, inputs: Inputs, k: np.ndarray, v: np.ndarray, repeats: int) -> Stats:
    n = spec.max_positions
    layer_k = apply_rope(k, np.arange(n), spec)
    q_rot = apply_rope(inputs.q(1, spec), np.array([n - 1]), spec)
    attention(q_rot, layer_k, v, spec)  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        attention(q_rot, layer_k, v, spec)
        seconds.append(time.perf_counter() - start)
    return Stats.of(seconds)


def run_case(backend: Any, label: str, spec: CacheSpec, limits: Limits, args: argparse.Namespace,
             floors: Floors, progress: Progress) -> Case:
    """The case's figures, or its status and why not (skipped, not supported, failed)."""
    n = spec.max_positions
    # Beside the cache: the float64 K and V of one layer, rotated, for the reference.
    working = 4 * 2 * n * spec.n_kv_heads * spec.head_dim * 8 if args.reference else 0
    empty = Case(label, spec.kv_dtype, n, spec.kv_bytes(n))
    reason = cache_preflight(backend, spec, working)
    if reason:
        empty.status, empty.reason = "skipped", reason
        return empty
    try:
        case = bench_case(backend, label, spec, limits, args.repeats, args.chunk, args.seed, floors, progress,
                          args.reference)
    except NotSupported as exc:
        empty.status, empty.reason = "not supported", exc.reason
        return empty
    except LongctxError as exc:
        empty.status, empty.reason = "failed", str(exc)
        return empty
    finally:
        progress.clear()
    case.load_average = _load_average()
    return case


def _load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# --- output -------------------------------------------------------------------------------

HEADERS = ["workload", "median", "unit", "spread", "GB/s", "fraction"]


def _title(case: Case) -> str:
    return f"{case.kv_dtype} @ {case.positions} positions: KV {format_bytes(case.kv_bytes)}"


def _roof_line(case: Case) -> str:
    roof = case.roofline
    load = f"; load average {', '.join(map(str, case.load_average))}" if case.load_average else ""
    return (f"beside it: copy {roof['copy_gbps']:.2f} GB/s one way, read {roof['read_gbps']:.2f} GB/s, "
            f"matmul {roof['matmul_gflops']:.1f} GFLOP/s{load}")


def _cell(figure: Figure) -> str:
    _, median, unit, spread, gbps, fraction = figure.row()
    text = f"{median} {unit} {spread}"
    if gbps:
        text += f", {gbps} GB/s"
    if fraction:
        text += f" ({fraction})"
    return text


def _status(cases: Sequence[Case]) -> int:
    """1 when a case failed or a fraction is below its floor."""
    failed = any(c.status == "failed" for c in cases)
    below = any(f.passed is False for c in cases for f in c.figures)
    return int(failed or below)


def to_json(cases: Sequence[Case], backends: Sequence[Dict[str, Any]], args: argparse.Namespace) -> Dict[str, Any]:
    return {
        "tool": f"longctx-bench {__version__}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "command": "longctx-bench " + " ".join(sys.argv[1:]) if args.argv is None else "longctx-bench " + " ".join(args.argv),
        "shape": args.shape,
        "backends": list(backends),
        "cases": [c.as_dict() for c in cases],
    }


def markdown(doc: Dict[str, Any]) -> str:
    """The docs' results tables, from longctx-bench's JSON: one row per backend, dtype and
    length, with the headline fractions."""
    lines = [f"`{doc.get('command', 'longctx-bench')}` ({doc.get('tool', '')}, python {doc.get('python', '')}, "
             f"numpy {doc.get('numpy', '')}, shape {doc.get('shape', '')})", ""]
    for backend in doc.get("backends", []):
        lines.append(f"- {backend.get('label')}: {backend.get('description', '')}")
    lines += ["", "| backend | kv dtype | positions | open | prefill fill | decode attention | prefill attention "
              "| load |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for case in doc.get("cases", []):
        if case["status"] != "ok":
            lines.append(f"| {case['backend']} | {case['kv_dtype']} | {case['positions']} | "
                         f"{case['status']}: {case['reason']} | | | | |")
            continue
        figures = {f["workload"].split(" (")[0]: f for f in case["figures"]}

        def show(key: str, digits: str = ".2f") -> str:
            f = figures[key]
            gbps = f"{f['gbps']:{digits}} GB/s, " if f.get("gbps") is not None else f"{f['median']:.4g} {f['unit']}, "
            mark = "" if f.get("passed") is None else (" ok" if f["passed"] else " BELOW")
            return f"{gbps}{f['fraction']:.0%} of {f['of']}{mark}"

        opened = figures["open"]
        load = ", ".join(map(str, case.get("load_average") or []))
        lines.append(f"| {case['backend']} | {case['kv_dtype']} | {case['positions']} | {opened['median'] / 1e3:.2f} s "
                     f"| {show('prefill-style fill')} | {show('decode attention, all layers')} "
                     f"| {show('prefill attention')} | {load} |")
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------------


def _describe(label: str, backend: Any, limits: Limits) -> str:
    info = backend.info()
    versions = ", ".join(f"{k} {v}" for k, v in info.versions.items())
    return (f"{info.name} ({info.device_kind}: {info.device_name}; {versions}); limits: {limits.method}; "
            f"{limits.matmul_method}")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 10:
        raise argparse.ArgumentTypeError(f"{text!r} should be a fraction such as 0.6")
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="longctx-bench", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--backend", action="append",
                        help="backend name, NAME[key=value] or module:factory; repeat for a side-by-side table "
                             "(default cpu)")
    parser.add_argument("--shape", default="qwen3-0.6b", help="preset, file or key=value,...")
    parser.add_argument("--positions", default="16384", help="comma-separated positions (e.g. 4096,16384,65536)")
    parser.add_argument("--kv-dtype", default="float16", help="comma-separated kv dtypes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=512, help="positions per prefill chunk and prefill queries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fill-floor", type=_fraction, help="least prefill fill / copy; below it the exit status is 1")
    parser.add_argument("--decode-floor", type=_fraction, help="least decode attention / read")
    parser.add_argument("--prefill-attention-floor", type=_fraction, help="least prefill attention / matmul")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to PATH as JSON")
    parser.add_argument("--markdown", metavar="JSON", help="print the results table of a --json file and exit")
    parser.add_argument("--no-progress", action="store_true", help="no status line on stderr")
    parser.add_argument("--reference", action="store_true",
                        help="also time the float64 reference's decode query over one layer (slow: seconds at 16K)")
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)
    if args.markdown:
        try:
            with open(args.markdown, encoding="utf-8") as handle:
                print(markdown(json.load(handle)), end="")
        except (OSError, ValueError, KeyError) as exc:
            parser.error(f"--markdown {args.markdown}: {exc}")
        return 0
    if args.repeats < 1 or args.chunk < 1:
        parser.error("--repeats and --chunk should be positive")
    labels = args.backend or ["cpu"]
    try:
        backends = [load_backend(label) for label in labels]
        shape = parse_shape(args.shape)
        positions = parse_positions(args.positions)
        dtypes = parse_kv_dtypes(args.kv_dtype)
    except LongctxError as exc:
        parser.error(str(exc))
    floors = Floors(args.fill_floor, args.decode_floor, args.prefill_attention_floor)
    progress = Progress(not args.no_progress)
    rooflines = RooflineCache()  # one per command: two --backend cupy[device=N] get their own figures
    limits = [Limits(backend, label, rooflines) for label, backend in zip(labels, backends)]
    described = [{"label": label, "description": _describe(label, b, lim)}
                 for label, b, lim in zip(labels, backends, limits)]
    print(f"longctx-bench {__version__}: python {platform.python_version()}, numpy {np.__version__}")
    for entry in described:
        print(f"{entry['label']}: {entry['description']}")
    print(f"shape {args.shape} ({shape.describe()}); fill: stored bytes/s over copy (one way); decode attention: "
          f"K+V bytes/s over read; each the median of per-repeat ratios to probes beside them", flush=True)
    cases: List[Case] = []
    try:
        for dtype in dtypes:
            for n in positions:
                spec = shape.replace(kv_dtype=dtype, max_positions=n)
                batch = [run_case(b, label, spec, lim, args, floors, progress)
                         for label, b, lim in zip(labels, backends, limits)]
                cases += batch
                _print_cases(batch, labels)
    finally:
        for lim in limits:
            lim.close()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(to_json(cases, described, args), handle, indent=1)
            handle.write("\n")
    return _status(cases)


def _print_cases(batch: Sequence[Case], labels: Sequence[str]) -> None:
    print(f"\n{_title(batch[0])}")
    done = [c for c in batch if c.status == "ok"]
    if len(batch) == 1 and done:
        print(_roof_line(done[0]))
        print(tabulate([f.row() for f in done[0].figures], headers=HEADERS))
    elif done:
        for case in done:
            print(f"{case.backend}: {_roof_line(case)}")
        table = [[figure.workload] + [_cell(c.figures[i]) if c.status == "ok" else "" for c in batch]
                 for i, figure in enumerate(done[0].figures)]
        print(tabulate(table, headers=["workload", *labels]))
    for case in batch:
        if case.status != "ok":
            print(f"{case.backend}: {case.status}, {case.reason}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
