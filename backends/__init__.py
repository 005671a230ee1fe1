"""The built-in backends, one module per backend family.

A backend depends on the contract (``pytest_longctx.spec``, ``.protocol``,
``.errors``, ``.rope``) and never on the suite. Built-ins are listed here by
import path so that listing them imports nothing heavy.
"""

from __future__ import annotations

from typing import NamedTuple


class Builtin(NamedTuple):
    factory: str  # "module:attribute", called with the backend's options
    device_kind: str
    kind: str = "cache"  # "cache": a KVBackend; "runtime": a RuntimeBackend (whole model)


BUILTINS = {
    "numpy": Builtin("pytest_longctx.backends.numpy_backend:NumpyBackend", "cpu"),
    "cupy": Builtin("pytest_longctx.backends.cupy_backend:CupyBackend", "gpu"),
    "onnxruntime": Builtin("pytest_longctx.backends.onnxruntime_backend:OnnxRuntimeBackend", "cpu"),
    "rkllm": Builtin("pytest_longctx.backends.rkllm_backend:RkllmBackend", "npu", "runtime"),
    "llamacpp": Builtin("pytest_longctx.backends.llamacpp_backend:LlamaCppBackend", "cpu", "runtime"),
    # Kind "cpu" although it runs on GPUs too: aliases take the first available built-in of a
    # kind, so "cpu" always finds numpy first, while "gpu" would land on torch's CPU fallback
    # when CuPy is missing. torch is reached by name; its info() says where it runs.
    "torch": Builtin("pytest_longctx.backends.torch_backend:TorchBackend", "cpu"),
    "transformers": Builtin("pytest_longctx.backends.transformers_backend:TransformersBackend", "cpu", "runtime"),
    # OpenVINO's CPU plugin by default; openvino[device=NPU] is a member of the "npu" alias, tried
    # after rkllm (see ALIAS_MEMBERS).
    "openvino": Builtin("pytest_longctx.backends.openvino_backend:OpenVinoBackend", "cpu"),
}

# Device-kind aliases: the first available built-in of that kind is used.
ALIASES = {"cpu": "cpu", "gpu": "gpu", "npu": "npu"}

# Built-ins an alias also reaches with options that put them on that kind of device, tried after
# the built-ins of that kind: "npu" is the NPU that is present, RKLLM's (Rockchip) first, as
# before, then Intel's through OpenVINO. No machine has both, so the order decides only which
# reasons come first when neither is there.
ALIAS_MEMBERS = {"npu": (("openvino", {"device": "NPU"}),)}
