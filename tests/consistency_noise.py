"""Measure the logits noise a correct llama.cpp shows between ways of feeding one prompt.

The runtime equivalence group asks that the last logits of a prompt fed in chunks
(then one token at a time) equal those of one prefill. A correct engine does not
give them bit for bit: llama.cpp's kernels sum in an order that depends on the
batch (n_batch, n_ubatch) and the thread count, and a float16 cache rounds what
it stores. This script measures that noise on tiny random-weight GGUFs of a
geometry no test uses (3 layers, 6 query heads over 2 KV heads of 32), for every
KV cache type and flash attention on and off, and prints one row per way:

- within a configuration: the chunked tail (chunks of 512, then 16 single tokens)
  against one prefill, as conformance/test_runtime_equivalence.py does;
- across configurations: one prefill against one prefill of the first
  configuration (n_batch 512, 1 thread) of the same cache type.

KL is llama.cpp's ``perplexity --kl-divergence`` figure: KL(reference || test) in
nats on the softmax of the logits. The bounds of pytest_longctx/measure/consistency.py
are derived from the largest KL of each cache type.

    .venv/bin/python tests/consistency_noise.py [--depth 8192] [--seeds 5,6]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Dict, List, Tuple

import numpy as np

from pytest_longctx.backends import llamacpp_backend as L
from pytest_longctx.measure.metrics import compare_logits
from pytest_longctx.measure.prefill import tail_logits, token_ids
from pytest_longctx.tools.tinygguf import write_tiny_gguf

# (n_batch, n_ubatch, threads): the first is the reference of the across-configuration rows.
CONFIGS: List[Tuple[int, int, int]] = [(512, 512, 1), (256, 128, 2), (512, 512, 2), (2048, 512, 1), (8192, 2048, 1)]
CACHES = [("f32", False), ("f32", True), ("f16", False), ("f16", True), ("q8_0", True), ("q4_0", True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=8192)
    parser.add_argument("--seeds", default="5,6", help="model seeds (one GGUF each)")
    parser.add_argument("--caches", default=",".join(f"{kv}:{'on' if fa else 'off'}" for kv, fa in CACHES),
                        help="cache type:flash attention pairs, e.g. f16:on,f32:off")
    parser.add_argument("--configs", type=int, default=len(CONFIGS), help="the first N configurations only")
    args = parser.parse_args()
    caches = [(kv, fa == "on") for kv, fa in (c.split(":") for c in args.caches.split(","))]
    worst: Dict[str, List[float]] = {}
    print(f"{'model':8} {'kv':5} {'flash':5} {'n_batch/ubatch/thr':18} {'compared':22} "
          f"{'rel max|d|':>10} {'KL':>9} top1")
    with tempfile.TemporaryDirectory() as root:
        for seed in (int(s) for s in args.seeds.split(",")):
            model = write_tiny_gguf(os.path.join(root, f"m{seed}.gguf"), context=args.depth, layers=3,
                                    width=192, heads=6, kv_heads=2, seed=seed)
            ids = token_ids(3, 256, args.depth)
            for kv, flash in caches:
                base = None
                for n_batch, n_ubatch, threads in CONFIGS[:args.configs]:
                    backend = L.LlamaCppBackend(kv_type=kv, flash_attn=flash, n_threads=threads,
                                                n_batch=n_batch, n_ubatch=n_ubatch)
                    runtime = backend.open_runtime(str(model))
                    one = runtime.prefill(ids)
                    runtime.reset()
                    chunked = tail_logits(runtime.prefill, ids, 16, 512)[-1]
                    runtime.close()
                    rows = [("chunked vs one-shot", compare_logits(chunked, one))]
                    if base is None:
                        base = one
                    else:
                        rows.append(("one-shot vs 512/512/1", compare_logits(one, base)))
                    for what, c in rows:
                        worst.setdefault(runtime.kv_spec.kv_dtype, []).append(c.kl)
                        print(f"s{seed:<7} {kv:5} {str(flash):5} {f'{n_batch}/{n_ubatch}/{threads}':18} "
                              f"{what:22} {c.relative:10.2%} {c.kl:9.2e} {'same' if c.top1 else 'DIFF'}",
                              flush=True)
    for dtype, kls in worst.items():
        print(f"{dtype}: largest KL {max(kls):.2e} nats over {len(kls)} comparisons (median {np.median(kls):.1e})")


if __name__ == "__main__":
    main()
