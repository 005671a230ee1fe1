"""Golden logits: what a float reference run of a model gives for seeded token ids.

A whole-model runtime's accuracy is judged against the logits of the same
model and the same tokens from a float reference run (llama.cpp on float32
weights with a float32 KV cache, or the model's own framework). The file
carries its token ids, so every runtime is asked the same question, and at
each depth the logits of the last ``tail`` positions: the context is
prefilled to ``depth - tail`` and then one token at a time, each call giving
the next-token logits. ``longctx-logits`` writes such a file from any runtime
that returns logits; the equivalence group reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from .errors import LongctxError, SpecError
from .inputs import seed_for
from .protocol import ModelRuntime

FORMAT = "pytest-longctx golden logits 1"
TAIL = 16


def token_ids(seed: int, vocab_size: int, n: int) -> np.ndarray:
    """The run's prompt: n token ids drawn uniformly from the vocabulary with the run's seed."""
    rng = np.random.default_rng(seed_for(seed, "runtime-tokens"))
    return rng.integers(0, vocab_size, size=n, dtype=np.int64).astype(np.int32)


# One prefill call: token ids in, the last position's logits out. The suite passes its
# guarded call (one-line failures, shape and NaN checks); the command passes its own.
Prefill = Callable[[Sequence[int]], Optional[np.ndarray]]


def prefill_chunks(prefill: Prefill, ids: Sequence[int], chunk: int) -> Optional[np.ndarray]:
    """Prefill ids in chunks of ``chunk``; the logits the last chunk returned."""
    logits = None
    for start in range(0, len(ids), chunk):
        logits = prefill(ids[start:start + chunk])
    return logits


def tail_logits(prefill: Prefill, ids: Sequence[int], tail: int, chunk: int) -> np.ndarray:
    """From an empty context: prefill ids[:-tail] in chunks, then one token at a time.

    Returns (tail, vocab): row i holds the logits after ids[: len(ids) - tail + i + 1].
    """
    head = len(ids) - tail
    if head > 0:
        prefill_chunks(prefill, ids[:head], chunk)
    return np.stack([np.asarray(prefill(ids[i:i + 1])) for i in range(head, len(ids))])


@dataclass
class GoldenLogits:
    """A golden-logits file: its token ids, depths and the tail logits at each depth."""

    path: str
    tokens: np.ndarray  # int32 (max depth,)
    depths: List[int]
    tail: int
    logits: np.ndarray  # float32 (len(depths), tail, vocab)
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return int(self.logits.shape[-1])

    def at(self, depth: int) -> np.ndarray:
        return self.logits[self.depths.index(depth)]


def write(path: str, tokens: np.ndarray, depths: Sequence[int], tail: int, logits: np.ndarray,
          meta: Dict[str, Any]) -> None:
    with open(path, "wb") as f:
        np.savez_compressed(f, format=np.array(FORMAT), tokens=np.asarray(tokens, np.int32),
                            depths=np.asarray(depths, np.int64), tail=np.array(tail),
                            logits=np.asarray(logits, np.float32), meta=np.array(json.dumps(meta)))


def load(path: str) -> GoldenLogits:
    """Read and check a golden-logits file; anything wrong is a one-line SpecError naming it."""
    def bad(what: str) -> SpecError:
        return SpecError(f"reference logits {path}: {what}")

    if not os.path.isfile(path):
        raise bad("no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            content = {key: data[key] for key in data.files}
    except Exception as exc:
        raise bad(f"not a file written by longctx-logits ({type(exc).__name__}: {exc})") from None
    if str(content.get("format", "")) != FORMAT:
        raise bad(f"format is {str(content.get('format', 'missing'))!r}, but should be {FORMAT!r}")
    tokens, depths = content["tokens"], [int(d) for d in content["depths"]]
    tail, logits = int(content["tail"]), content["logits"]
    if logits.ndim != 3 or logits.shape[:2] != (len(depths), tail):
        raise bad(f"logits of shape {logits.shape}, but should be ({len(depths)}, {tail}, vocab)")
    if not depths or max(depths) > tokens.size or min(depths) < tail:
        raise bad(f"depths {depths} do not fit {tokens.size} tokens with a tail of {tail}")
    if not np.all(np.isfinite(logits)):
        raise bad("logits hold NaN or Inf")
    return GoldenLogits(path, tokens, depths, tail, logits, json.loads(str(content["meta"])))


# ----------------------------------------------------------------------------- command


def _parser() -> argparse.ArgumentParser:
    from .settings import DEFAULT_POSITIONS

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
    from .registry import load_backend
    from .settings import parse_positions

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
