"""openvino-genai's saved IR: the RoPE inverse-frequency table is float16, so logits drift with length.

LLMPipeline(..., enable_save_ov_model=True) serializes the model it built from a GGUF with fp16
compression of its constants (save_openvino_model(model, path, compress_to_fp16=true)); the
rotary table theta^(-2i/d) is one of them. An angle p * inv_freq[i] is then off by
p * |inv_freq16[i] - inv_freq[i]| (relative error up to 4e-4 here): up to 0.65 rad at
p = 4095. Run with the f32 precision hint and an f32 KV cache, the IR's last
logits drift from a float64 forward pass of the same GGUF as the prompt grows.

Traced by changing one thing at a time on the saved IR (max |logit - float64| of the last
position at each prompt length):
  as saved                               grows with length (1.5e-6 at 1 token, 1.3e-2 at 4096)
  (rotary layout)                        not the cause: with the table restored (last row) the IR
                                          agrees with the adjacent-pair float64 pass at 4096; a wrong
                                          layout is O(1) off (a rotate-half reference: 0.3 to 1.5)
  f16 weights replaced by f32 constants  unchanged: weight decompression is not the cause
  DYNAMIC_QUANTIZATION_GROUP_SIZE=0      unchanged: activation quantization is not the cause
  rotary table put back in float32       ~1e-6 at every length: the table is the whole drift

Run: python docs/findings/openvino_genai_rope_table.py   (openvino-genai, gguf, pytest-longctx; ~1 min)
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import openvino as ov
import openvino_genai as og
from openvino import opset13 as ops

from pytest_longctx.tools.tinygguf import reference_logits, write_tiny_gguf

LENGTHS = (1, 64, 512, 2048, 4096)
HEAD_DIM, THETA = 32, 10000.0


def rope_table(model):
    """The float16 Constant holding theta^(-2i/d), and the Convert that widens it."""
    exact = THETA ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    for node in model.get_ordered_ops():
        if (node.get_type_name() == "Constant" and node.get_output_element_type(0) == ov.Type.f16
                and node.get_output_shape(0) == [1, HEAD_DIM // 2, 1]
                and np.allclose(node.get_data().ravel(), exact, rtol=1e-3)):
            return node, next(iter(node.output(0).get_target_inputs())).get_node(), exact
    raise SystemExit("no float16 rotary table in this IR")


def run(xml, ids, reference, change=None, config=None):
    core = ov.Core()
    model = core.read_model(xml)
    if change:
        change(model)
    request = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32",
                                                **(config or {})}).create_infer_request()
    errors = []
    for n in LENGTHS:
        request.reset_state()
        request.infer({"input_ids": ids[None, :n], "attention_mask": np.ones((1, n), np.int64),
                       "position_ids": np.arange(n)[None], "beam_idx": np.zeros(1, np.int32)})
        errors.append(np.abs(request.get_tensor("logits").data[0, -1] - reference[n - 1]).max())
    return "  ".join(f"{e:8.1e}" for e in errors)


def exact_table(model):
    _, convert, exact = rope_table(model)
    convert.output(0).replace(ops.constant(exact.astype(np.float32).reshape(1, -1, 1)).output(0))


def f32_weights(model):
    for node in model.get_ordered_ops():
        source = node.input(0).get_source_output().get_node() if node.get_input_size() else None
        if (node.get_type_name() == "Convert" and source is not None and source.get_type_name() == "Constant"
                and source.get_output_element_type(0) == ov.Type.f16 and len(source.get_output_shape(0)) == 2):
            node.output(0).replace(ops.constant(source.get_data().astype(np.float32)).output(0))


def main():
    folder = Path(tempfile.mkdtemp())
    gguf_path = write_tiny_gguf(folder / "m.gguf", context=4096, dtype="f16", tokenizer="gpt2")
    og.LLMPipeline(str(gguf_path), "CPU", enable_save_ov_model=True)
    xml = str(folder / "openvino_model.xml")
    ids = np.random.default_rng(0).integers(0, 320, max(LENGTHS))
    reference = reference_logits(gguf_path, ids)
    table, _, exact = rope_table(ov.Core().read_model(xml))
    stored = table.get_data().ravel().astype(np.float64)
    print(f"openvino-genai {og.__version__}; rotary table in the IR: float16, max relative error "
          f"{np.max(np.abs(stored - exact) / exact):.1e}, angle error at position 4095 up to "
          f"{4095 * np.max(np.abs(stored - exact)):.2f} rad")
    print(f"{'max |logit - float64| at length':>40}  " + "  ".join(f"{n:>8}" for n in LENGTHS))
    print(f"{'as saved':>40}  {run(xml, ids, reference)}")
    print(f"{'f16 weights as f32 constants':>40}  {run(xml, ids, reference, f32_weights)}")
    print(f"{'DYNAMIC_QUANTIZATION_GROUP_SIZE=0':>40}  "
          f"{run(xml, ids, reference, config={'DYNAMIC_QUANTIZATION_GROUP_SIZE': 0})}")
    print(f"{'rotary table put back in float32':>40}  {run(xml, ids, reference, exact_table)}")


if __name__ == "__main__":
    sys.exit(main())
