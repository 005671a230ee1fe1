"""``longctx-logits``: write golden logits of seeded token ids from a whole-model runtime
(a float reference run), for ``--longctx-reference-logits``. The file format is
``measure.golden``; the prompt and its prefill are ``measure.prefill``."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Optional, Sequence

import numpy as np

from ..access.registry import load_backend
from ..errors import LongctxError, SpecError
from ..measure.golden import TAIL, write
from ..measure.prefill import tail_logits, token_ids
from ..protocol import ModelRuntime
from ..session.settings import DEFAULT_POSITIONS, parse_positions


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longctx-logits",
        description="Write golden logits of seeded token ids from a whole-model runtime (a float "
        "reference run), for --longctx-reference-logits.")
    parser.add_argument("--backend", required=True, help="a runtime backend, e.g. llamacpp[kv_type=f32,flash_attn=false]")
    parser.add_argument("--model", required=True, help="the model file")
    parser.add_argument("--context", type=int, default=None, help="context to ask for (default: the model's)")
    parser.add_argument("--positions", default=",".join(map(str, DEFAULT_POSITIONS)),
                        help="depths, as --longctx-positions (those above the context are left out)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the token ids (default 0)")
    parser.add_argument("--tail", type=int, default=TAIL, help=f"positions per depth (default {TAIL})")
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk (default 512)")
    parser.add_argument("-o", "--output", required=True, help="the .npz file to write")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        backend = load_backend(args.backend)
        if not hasattr(backend, "open_runtime"):
            raise SpecError(f"backend {args.backend!r} is not a whole-model runtime (no open_runtime)")
        runtime = backend.open_runtime(os.path.abspath(args.model), args.context)
    except (LongctxError, OSError) as exc:
        print(f"longctx-logits: {exc}", file=sys.stderr)
        return 2
    try:
        depths = [d for d in parse_positions(args.positions) if args.tail <= d <= runtime.context_limit]
        if not depths:
            print(f"longctx-logits: no depth in {args.positions} fits the context {runtime.context_limit}",
                  file=sys.stderr)
            return 2
        tokens = token_ids(args.seed, runtime.vocab_size, max(depths))
        rows = []
        for depth in depths:
            runtime.reset()
            started = time.perf_counter()
            rows.append(tail_logits(lambda ids: _logits(runtime, ids), tokens[:depth], args.tail, args.chunk))
            print(f"depth {depth}: {args.tail} positions in {time.perf_counter() - started:.1f} s")
        info = backend.info()
        meta = {"backend": args.backend, "model": os.path.basename(args.model), "seed": args.seed,
                "context": runtime.context_limit, "kv_dtype": runtime.kv_spec.kv_dtype,
                "device": f"{info.device_kind} {info.device_name}".strip(), "versions": dict(info.versions),
                "host": platform.node(), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write(args.output, tokens, depths, args.tail, np.stack(rows), meta)
    except LongctxError as exc:
        print(f"longctx-logits: {exc}", file=sys.stderr)
        return 1
    finally:
        runtime.close()
    print(f"wrote {args.output}: {len(depths)} depths x {args.tail} positions x {runtime.vocab_size} tokens")
    return 0


def _logits(runtime: ModelRuntime, ids: Sequence[int]) -> np.ndarray:
    value = runtime.prefill(ids)
    if value is None:
        raise SpecError(f"the runtime returned no logits (prefill of {len(ids)} tokens at position "
                        f"{runtime.positions()}): it cannot serve as a reference")
    return np.asarray(value, dtype=np.float32)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
