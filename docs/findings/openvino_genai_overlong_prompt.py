"""openvino-genai: a prompt longer than the model's context is accepted without an error.

A GGUF whose llama.context_length is 1024: LLMPipeline.generate takes prompts of 1024, 1025 and
1400 tokens alike and returns tokens for each; the converted stateful IR, run by openvino.Core,
likewise holds 1400 positions. Nothing refuses a position past the context the model states (the
RoPE angles and attention simply run on), so a certification must report it: pytest-longctx's
limits group fails test_one_token_more_is_rejected_and_changes_nothing and
test_prompt_crossing_the_limit_is_rejected_whole on this backend.

Run: python docs/findings/openvino_genai_overlong_prompt.py   (openvino-genai, gguf, pytest-longctx)
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import openvino as ov
import openvino_genai as og

from pytest_longctx.tools.tinygguf import write_tiny_gguf


def main():
    folder = Path(tempfile.mkdtemp())
    model = write_tiny_gguf(folder / "m.gguf", context=1024, dtype="f16", tokenizer="gpt2")
    pipe = og.LLMPipeline(str(model), "CPU", enable_save_ov_model=True)
    config = og.GenerationConfig()
    config.max_new_tokens = 4
    rng = np.random.default_rng(0)
    print(f"openvino-genai {og.__version__}: model context 1024 (llama.context_length)")
    for n in (1024, 1025, 1400):
        ids = rng.integers(0, 320, n)[None].astype(np.int64)
        result = pipe.generate(og.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids))), config)
        print(f"LLMPipeline.generate, {n}-token prompt: no error, tokens {list(result.tokens[0])}")

    request = ov.Core().compile_model(str(folder / "openvino_model.xml"), "CPU").create_infer_request()
    ids = rng.integers(0, 320, 1400)[None].astype(np.int64)
    request.infer({"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(1400)[None],
                   "beam_idx": np.zeros(1, np.int32)})
    held = request.query_state()[0].state.shape[2]
    print(f"openvino.Core on the saved IR, 1400-token prompt: no error, the state holds {held} positions")


if __name__ == "__main__":
    sys.exit(main())
