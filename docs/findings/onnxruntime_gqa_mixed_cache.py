"""ONNX Runtime CPU GroupQueryAttention: float32 Q/K/V beside a float16 shared past/present cache.

With past_key/present_key (and the values) bound to one float16 buffer of max_sequence_length
rows and float32 query/key/value, the CPU kernel
  1. writes zeros to every row at or past the new total length (float16 Q/K/V, or float32 with a
     float32 cache, leave those rows as they were), and
  2. takes time proportional to max_sequence_length, not to the positions attended: a one-token
     step costs about the same with 64 positions as with 16384 in the cache.

Run: python docs/findings/onnxruntime_gqa_mixed_cache.py   (onnx, onnxruntime, numpy)
"""

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as P
from onnx import helper


def session(io, cache, heads=16, kv_heads=8, d=128):
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length"]
    node = helper.make_node("GroupQueryAttention", names, ["output", "present_key", "present_value"],
                            domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads)
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([node], "gqa", [
        vi("query", io, [1, "S", heads * d]), vi("key", io, [1, "S", kv_heads * d]),
        vi("value", io, [1, "S", kv_heads * d]), vi("past_key", cache, [1, kv_heads, "M", d]),
        vi("past_value", cache, [1, kv_heads, "M", d]), vi("seqlens_k", P.INT32, [1]),
        vi("total_sequence_length", P.INT32, [])], [
        vi("output", io, [1, "S", heads * d]), vi("present_key", cache, [1, kv_heads, "M", d]),
        vi("present_value", cache, [1, kv_heads, "M", d])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def step(sess, io_np, buffers, past, heads=16, kv_heads=8, d=128):
    """One token at position ``past``; past and present bound to the same buffers."""
    k_buf, v_buf = buffers
    binding = sess.io_binding()
    binding.bind_cpu_input("query", np.zeros((1, 1, heads * d), io_np))
    binding.bind_cpu_input("key", np.ones((1, 1, kv_heads * d), io_np))
    binding.bind_cpu_input("value", np.ones((1, 1, kv_heads * d), io_np))
    pk, pv = ort.OrtValue.ortvalue_from_numpy(k_buf), ort.OrtValue.ortvalue_from_numpy(v_buf)
    binding.bind_ortvalue_input("past_key", pk)
    binding.bind_ortvalue_input("past_value", pv)
    binding.bind_cpu_input("seqlens_k", np.array([past], np.int32))
    binding.bind_cpu_input("total_sequence_length", np.array(past + 1, np.int32))
    binding.bind_output("output")
    binding.bind_ortvalue_output("present_key", pk)
    binding.bind_ortvalue_output("present_value", pv)
    start = time.perf_counter()
    sess.run_with_iobinding(binding)
    return time.perf_counter() - start


print("onnxruntime", ort.__version__)
for name, io, io_np in (("float16 Q/K/V", P.FLOAT16, np.float16), ("float32 Q/K/V", P.FLOAT, np.float32)):
    sess = session(io, P.FLOAT16)
    buffers = (np.full((1, 8, 16, 128), 7, np.float16), np.full((1, 8, 16, 128), 7, np.float16))
    step(sess, io_np, buffers, past=3)
    print(f"{name}, float16 cache of 16 rows, one token at row 3; rows 0..15 of head 0 after:",
          buffers[0][0, 0, :, 0].astype(int).tolist())
    for rows in (1024, 16384):
        buffers = (np.zeros((1, 8, rows, 128), np.float16), np.zeros((1, 8, rows, 128), np.float16))
        seconds = sorted(step(sess, io_np, buffers, past=64) for _ in range(5))[2]
        print(f"  {name}, one token at position 64 in a buffer of {rows} rows: {seconds * 1e3:.2f} ms")
