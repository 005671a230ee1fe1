"""``longctx-bench``: print fill, retrieve and attention figures for one backend.

Speed targets live here, as printed figures, not in timed unit tests: every
figure is also a fraction of this device's memory bandwidth, probed in the same
run, because the machines this runs on are shared and noisy.

    longctx-bench --backend cpu --shape qwen3-0.6b --positions 16384 --kv-dtype float16
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from typing import List, Optional, Sequence

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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="longctx-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpu", help="backend name, NAME[key=value] or module:factory")
    parser.add_argument("--shape", default="qwen3-0.6b", help="preset, file or key=value,...")
    parser.add_argument("--positions", default="16384", help="comma-separated positions")
    parser.add_argument("--kv-dtype", default="float16", help="comma-separated kv dtypes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        backend = load_backend(args.backend)
        shape = parse_shape(args.shape)
        positions = parse_positions(args.positions)
        dtypes = parse_kv_dtypes(args.kv_dtype)
    except LongctxError as exc:
        parser.error(str(exc))
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
            # Beside the cache: the float64 K and V of one layer, rotated, for the reference.
            working = 4 * 2 * n * spec.n_kv_heads * spec.head_dim * 8
            reason = cache_preflight(backend, spec, working)
            if reason:
                print(f"{title}: skipped, {reason}")
                continue
            try:
                rows = bench_case(backend, spec, args.repeats, args.chunk, args.seed)
            except NotSupported as exc:
                print(f"{title}: not supported, {exc.reason}")
                continue
            except LongctxError as exc:
                print(f"{title}: failed, {exc}")
                status = 1
                continue
            print(title)
            print(tabulate(rows, headers=["workload", "median", "unit", "spread", "GB/s", "fraction"]))
    return status


if __name__ == "__main__":
    sys.exit(main())
