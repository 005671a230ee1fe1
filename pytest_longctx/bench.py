"""``longctx-bench``: print fill, retrieve and attention figures for one backend, or side by side.

Speed targets live here, as printed figures, not in timed unit tests: every
figure is also a fraction of this device's memory bandwidth, probed in the same
run, because the machines this runs on are shared and noisy.

    longctx-bench --backend cpu --shape qwen3-0.6b --positions 16384 --kv-dtype float16
    longctx-bench --backend cpu --backend onnxruntime --positions 16384 --kv-dtype float32,float16

With one ``--backend`` each case is a table of workloads; with several, one
table per case has a column per backend (each cell: median, spread, GB/s and
fraction of that backend's bandwidth). Backends run one after the other.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
from tabulate import tabulate

from . import __version__
from .errors import LongctxError, NotSupported
from .inputs import Inputs
from .measure import Stats, backend_bandwidth, cache_preflight, format_bytes
from .reference import apply_rope, attention
from .registry import load_backend
from .settings import parse_kv_dtypes, parse_positions
from .shapes import parse_shape
from .spec import CacheSpec
from .workloads import fill_traffic, native_pool, timed_pool_positions, time_decode_attention, time_retrieve, timed_fill


def _row(what: str, stats: Stats, unit: str, gbps: Optional[float], bandwidth: Optional[float],
         against: str) -> List[str]:
    fraction = f"{gbps / bandwidth:.0%} of {against}" if gbps is not None and bandwidth else ""
    return [what, f"{stats.median:.4g}", unit, f"±{stats.spread:.0%}", "" if gbps is None else f"{gbps:.2f}", fraction]


def bench_case(backend, spec: CacheSpec, repeats: int, chunk: int, seed: int) -> List[List[str]]:
    """Fill a cache of ``spec`` to max_positions and time every workload on it."""
    inputs = Inputs(seed, f"bench-{spec.kv_dtype}-{spec.max_positions}")
    pool = native_pool(backend, inputs, spec, timed_pool_positions(spec, spec.max_positions))
    bandwidth = backend_bandwidth(backend)
    decode = min(128, spec.max_positions // 2)
    cache = backend.open_cache(spec)
    try:
        filled = timed_fill(backend, cache, pool, min(chunk, pool.k.shape[0]), decode)
        if filled.fill.error:
            raise LongctxError(filled.fill.error)
        prefill = Stats.of([filled.chunk / s for s in filled.prefill_seconds])
        decode_fill = Stats.of([1 / s for s in filled.decode_seconds])
        ops_seconds, layer_seconds = time_retrieve(backend, cache, np.random.default_rng(seed), repeats)
        queries = backend.asarray(inputs.q(spec.n_layers * (repeats + 1), spec))
        token_seconds, _ = time_decode_attention(backend, cache, queries, repeats)
        n = spec.max_positions
        k, v = filled.fill.values(backend, 0, 0, n)
    finally:
        cache.close()
    per_position = fill_traffic(spec)
    layer_bytes = spec.kv_bytes(n) / spec.n_layers
    read = Stats.of([layer_bytes / s for s in layer_seconds])
    tokens = Stats.of([1 / s for s in token_seconds])
    layer_k = apply_rope(k, np.arange(n), spec)
    q = inputs.q(1, spec)
    q_rot = apply_rope(q, np.array([n - 1]), spec)
    attention(q_rot, layer_k, v, spec)  # warm-up
    reference_seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        attention(q_rot, layer_k, v, spec)
        reference_seconds.append(time.perf_counter() - start)
    reference = Stats.of(reference_seconds)
    copy, stream = bandwidth.copy_gbps, bandwidth.read_gbps
    return [
        _row("prefill-style fill", prefill, "pos/s", prefill.median * per_position / 1e9, copy, "copy"),
        _row("decode-style fill", decode_fill, "pos/s", decode_fill.median * per_position / 1e9, copy, "copy"),
        _row("retrieve (1-position reads)", Stats.of([1 / s for s in ops_seconds]), "ops/s", None, None, ""),
        _row("layer read, copied out", Stats.of([1 / s for s in layer_seconds]), "layers/s",
             read.median / 1e9, copy, "copy"),
        _row("decode attention, all layers", tokens, "tok/s", tokens.median * spec.kv_bytes(n) / 1e9, stream,
             "read"),
        ["reference decode query, 1 layer (float64)", f"{reference.median * 1e3:.4g}", "ms",
         f"±{reference.spread:.0%}", "", ""],
    ]


HEADERS = ["workload", "median", "unit", "spread", "GB/s", "fraction"]


def _cell(row: List[str]) -> str:
    """One backend's figures for a workload, for the side-by-side table."""
    _, median, unit, spread, gbps, fraction = row
    text = f"{median} {unit} {spread}"
    if gbps:
        text += f", {gbps} GB/s"
    if fraction:
        text += f" ({fraction})"
    return text


def _describe(label: str, backend: Any, bandwidth: Any) -> str:
    info = backend.info()
    versions = ", ".join(f"{k} {v}" for k, v in info.versions.items())
    return (f"{label}: {info.name} ({info.device_kind}: {info.device_name}; {versions}); bandwidth: copy "
            f"{bandwidth.copy_gbps:.1f} GB/s, read {bandwidth.read_gbps:.1f} GB/s ({bandwidth.method})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="longctx-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", action="append",
                        help="backend name, NAME[key=value] or module:factory; repeat for a side-by-side table "
                             "(default cpu)")
    parser.add_argument("--shape", default="qwen3-0.6b", help="preset, file or key=value,...")
    parser.add_argument("--positions", default="16384", help="comma-separated positions")
    parser.add_argument("--kv-dtype", default="float16", help="comma-separated kv dtypes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    labels = args.backend or ["cpu"]
    try:
        backends = [load_backend(label) for label in labels]
        shape = parse_shape(args.shape)
        positions = parse_positions(args.positions)
        dtypes = parse_kv_dtypes(args.kv_dtype)
    except LongctxError as exc:
        parser.error(str(exc))
    if len(backends) == 1:
        return _one_backend(backends[0], args, shape, positions, dtypes)
    return _side_by_side(labels, backends, args, shape, positions, dtypes)


def _run_case(backend: Any, spec: CacheSpec, args: argparse.Namespace) -> Tuple[Optional[List[List[str]]], str, int]:
    """The rows of one case, or None and why not (skipped, not supported, failed), and an exit status."""
    n = spec.max_positions
    # Beside the cache: the float64 K and V of one layer, rotated, for the reference.
    working = 4 * 2 * n * spec.n_kv_heads * spec.head_dim * 8
    reason = cache_preflight(backend, spec, working)
    if reason:
        return None, f"skipped, {reason}", 0
    try:
        return bench_case(backend, spec, args.repeats, args.chunk, args.seed), "", 0
    except NotSupported as exc:
        return None, f"not supported, {exc.reason}", 0
    except LongctxError as exc:
        return None, f"failed, {exc}", 1


def _one_backend(backend: Any, args: argparse.Namespace, shape: CacheSpec, positions: Sequence[int],
                 dtypes: Sequence[str]) -> int:
    info = backend.info()
    bandwidth = backend_bandwidth(backend)
    print(f"longctx-bench {__version__}: backend {info.name} ({info.device_kind}: {info.device_name}), "
          f"python {platform.python_version()}, numpy {np.__version__}")
    print(f"shape {args.shape} ({shape.describe()}); bandwidth: copy {bandwidth.copy_gbps:.1f} GB/s, "
          f"read {bandwidth.read_gbps:.1f} GB/s ({bandwidth.method})")
    status = 0
    for dtype in dtypes:
        for n in positions:
            spec = shape.replace(kv_dtype=dtype, max_positions=n)
            title = f"\n{dtype} @ {n} positions: KV {format_bytes(spec.kv_bytes(n))}"
            rows, why, failed = _run_case(backend, spec, args)
            status |= failed
            if rows is None:
                print(f"{title}: {why}")
                continue
            print(title)
            print(tabulate(rows, headers=HEADERS))
    return status


def _side_by_side(labels: Sequence[str], backends: Sequence[Any], args: argparse.Namespace, shape: CacheSpec,
                  positions: Sequence[int], dtypes: Sequence[str]) -> int:
    print(f"longctx-bench {__version__}: python {platform.python_version()}, numpy {np.__version__}")
    for label, backend in zip(labels, backends):
        print(_describe(label, backend, backend_bandwidth(backend)))
    print(f"shape {args.shape} ({shape.describe()}); each cell: median unit ±spread, GB/s (fraction of that "
          f"backend's bandwidth)")
    status = 0
    for dtype in dtypes:
        for n in positions:
            spec = shape.replace(kv_dtype=dtype, max_positions=n)
            print(f"\n{dtype} @ {n} positions: KV {format_bytes(spec.kv_bytes(n))}")
            columns, notes = [], []
            for label, backend in zip(labels, backends):
                rows, why, failed = _run_case(backend, spec, args)
                status |= failed
                columns.append(rows)
                if rows is None:
                    notes.append(f"{label}: {why}")
            workloads = next((rows for rows in columns if rows is not None), None)
            if workloads is not None:
                table = [[row[0]] + [_cell(rows[i]) if rows is not None else "" for rows in columns]
                         for i, row in enumerate(workloads)]
                print(tabulate(table, headers=["workload", *labels]))
            for note in notes:
                print(note)
    return status


if __name__ == "__main__":
    sys.exit(main())
