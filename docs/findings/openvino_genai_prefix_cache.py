"""openvino-genai LLMPipeline: a repeated prompt is served from its prefix cache.

LLMPipeline on CPU runs the continuous-batching (paged attention) path with prefix caching on by
default: the second time the same 4000 tokens arrive, their KV blocks are reused and the time to
first token falls by about two orders of magnitude. A throughput figure taken by repeating one
prompt would measure the cache, not the model. With SchedulerConfig(enable_prefix_caching=False)
the repeat costs what the first run did. (The openvino-genai backend of pytest-longctx runs the
converted IR through openvino.Core, which has no prefix cache.)

Run: python docs/findings/openvino_genai_prefix_cache.py   (openvino-genai, gguf, pytest-longctx)
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import openvino as ov
import openvino_genai as og

from pytest_longctx.tools.tinygguf import write_tiny_gguf


def ttft_ms(pipe, ids):
    inputs = og.TokenizedInputs(ov.Tensor(ids[None].astype(np.int64)), ov.Tensor(np.ones((1, len(ids)), np.int64)))
    config = og.GenerationConfig()
    config.max_new_tokens = 1
    return pipe.generate(inputs, config).perf_metrics.get_ttft().mean


def main():
    folder = Path(tempfile.mkdtemp())
    model = write_tiny_gguf(folder / "m.gguf", context=8192, layers=4, width=256, heads=8, kv_heads=2,
                            dtype="f16", tokenizer="gpt2")
    rng = np.random.default_rng(0)
    print(f"openvino-genai {og.__version__}, model {model.name}: 4 layers, width 256, 4000-token prompts")
    for label, extra in (("default", {}), ("prefix caching off", {"scheduler_config": _no_prefix_cache()})):
        pipe = og.LLMPipeline(str(model), "CPU", **extra)
        for trial in range(2):
            ids = rng.integers(0, 320, 4000)
            fresh, repeat = ttft_ms(pipe, ids), ttft_ms(pipe, ids)
            print(f"{label:>20}: fresh {fresh:7.1f} ms, same prompt again {repeat:7.1f} ms "
                  f"({fresh / repeat:5.1f}x)")
        del pipe


def _no_prefix_cache():
    config = og.SchedulerConfig()
    config.enable_prefix_caching = False
    return config


if __name__ == "__main__":
    sys.exit(main())
