"""The RKLLM stand-in: a small C library (rkllm_standin.c) that exports librkllmrt.so's symbols
with the struct layouts of RKLLM 1.2.1 or of 1.3.0 (a compile-time define) and a tiny
deterministic model, so that the rkllm backend's
ctypes binding is tested without an NPU. It is a stand-in, not the RKLLM runtime: see the C
file's header for what it copies from the real runtime and what it cannot know.

``build`` compiles it with the system C compiler (``cc -shared -fPIC -O2``, or $CC);
``write_model`` writes a stand-in model file; ``reference_logits`` recomputes in NumPy the
logits the stand-in gives, so the tests can check the binding's extraction bit for bit.

From a shell, to run the suite against the stand-in (prints the options to pass)::

    python tests/rkllm_standin /tmp/rkllm-standin --context 16384
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

SOURCE = Path(__file__).with_name("rkllm_standin.c")
FLAGS = ("-shared", "-fPIC", "-O2", "-Wall")
# Build variants: the defines of rkllm_standin.c.
VARIANTS: Dict[str, Tuple[str, ...]] = {
    "1.2.1": (),
    "1.2.1-split-version": ("-DSTANDIN_SPLIT_VERSION",),
    "1.3.0": ("-DSTANDIN_ABI_1_3",),
    "1.3.0-split-version": ("-DSTANDIN_ABI_1_3", "-DSTANDIN_SPLIT_VERSION"),
    "1.4.0": ("-DSTANDIN_ABI_1_3", '-DSTANDIN_VERSION="1.4.0"'),
    "1.2.0": ("-DSTANDIN_ABI_1_2_0",),
    "1.2.0-split-version": ("-DSTANDIN_ABI_1_2_0", "-DSTANDIN_SPLIT_VERSION"),
}


class StandinBuildError(RuntimeError):
    """No compiler, or the compiler's message."""


def compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(directory: os.PathLike, variant: str = "1.2.1") -> Path:
    """The stand-in library of that variant, compiled into ``directory`` (reused if there)."""
    cc = compiler()
    if cc is None:
        raise StandinBuildError("no C compiler (cc, gcc, clang or $CC) to build the RKLLM stand-in")
    defines = VARIANTS[variant]
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(FLAGS + defines).encode()])).hexdigest()[:12]
    target = Path(directory) / f"librkllmrt-standin-{variant}-{key}.so"
    if target.exists():
        return target
    Path(directory).mkdir(parents=True, exist_ok=True)
    temporary = target.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run([cc, *FLAGS, *defines, str(SOURCE), "-o", str(temporary)],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise StandinBuildError(f"{os.path.basename(cc)} could not build the RKLLM stand-in: "
                                + (done.stderr or done.stdout).strip()[-2000:])
    os.replace(temporary, target)
    return target


@dataclass(frozen=True)
class StandinModel:
    """The geometry a stand-in model file names (its header); small enough for tests."""

    n_layers: int = 4
    n_heads: int = 8  # not in the file: the stand-in has no attention; for the shape only
    n_kv_heads: int = 4
    head_dim: int = 64
    value_bytes: int = 2  # float16 K/V
    vocab_size: int = 512
    max_context: int = 4096
    seed: int = 7
    toolkit_version: Optional[str] = None  # the runtime refuses another major.minor
    target_platform: Optional[str] = None  # the runtime (an RK3588) refuses another
    eos_token: Optional[int] = None  # ends a native decode unless 1.3's ignore_eos_token

    def shape(self, separator: str = ";") -> str:
        """The shape option text: ``n_layers=4;n_heads=8;n_kv_heads=4;head_dim=64``."""
        return separator.join(f"{k}={getattr(self, k)}" for k in ("n_layers", "n_heads", "n_kv_heads", "head_dim"))

    def position_bytes(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.value_bytes


def write_model(directory: os.PathLike, name: Optional[str] = None, model: StandinModel = StandinModel()) -> Path:
    """A stand-in model file; its name carries the context (``...-ctx4096.rkllm``) unless given."""
    path = Path(directory) / (name or f"rkllm-standin-model-ctx{model.max_context}.rkllm")
    fields = asdict(model)
    fields.pop("n_heads")
    fields = {k: v for k, v in fields.items() if v is not None}
    path.write_text("RKLLM-STANDIN-MODEL 1\n" + "".join(f"{k}={v}\n" for k, v in fields.items()))
    return path


def write_shape(directory: os.PathLike, model: StandinModel = StandinModel()) -> Path:
    path = Path(directory) / "rkllm-standin-shape.toml"
    path.write_text("".join(f"{item.replace('=', ' = ')}\n" for item in model.shape().split(";")))
    return path


# --- the stand-in's arithmetic, in NumPy (uint64 wraps like C) ------------------------------

_M = np.uint64


def _mix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + _M(0x9E3779B97F4A7C15)
        x = (x ^ (x >> _M(30))) * _M(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _M(27))) * _M(0x94D049BB133111EB)
        return x ^ (x >> _M(31))


def states(tokens: Sequence[int], seed: int = StandinModel.seed) -> np.ndarray:
    """The stand-in's state after each token of the sequence."""
    state = _mix(np.array([seed], np.uint64))[0]
    out = np.empty(len(tokens), np.uint64)
    with np.errstate(over="ignore"):
        salt = _M(0x1000193) * _M(seed)
        for i, token in enumerate(tokens):
            state = _mix(np.array([state ^ _mix(np.array([_M(token & 0xFFFFFFFF) + salt], np.uint64))[0]],
                                  np.uint64))[0]
            out[i] = state
    return out


def reference_logits(tokens: Sequence[int], model: StandinModel = StandinModel()) -> np.ndarray:
    """The logits the stand-in gives after this token sequence (from an empty context)."""
    state = states(tokens, model.seed)[-1]
    with np.errstate(over="ignore"):
        v = np.arange(1, model.vocab_size + 1, dtype=np.uint64) * _M(0xD1B54A32D192ED03)
    x = _mix(v ^ state)
    return ((x >> _M(40)).astype(np.float32) * np.float32(8.0 / 16777216.0) - np.float32(4.0)).astype(np.float32)


def greedy(tokens: Sequence[int], n: int, model: StandinModel = StandinModel()) -> list:
    """n greedy tokens after the sequence, as the stand-in's model decodes them."""
    sequence, out = list(tokens), []
    for _ in range(n):
        token = int(np.argmax(reference_logits(sequence, model)))
        out.append(token)
        sequence.append(token)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python tests/rkllm_standin",
                                     description="Build the RKLLM stand-in and a stand-in model to run the suite on.")
    parser.add_argument("directory")
    parser.add_argument("--context", type=int, default=16384, help="the model's context (in its file name too)")
    parser.add_argument("--variant", default="1.2.1", choices=sorted(VARIANTS))
    args = parser.parse_args(argv)
    model = StandinModel(max_context=args.context)
    library = build(args.directory, args.variant)
    path = write_model(args.directory, model=model)
    shape = write_shape(args.directory, model)
    print(f"stand-in library (not the RKLLM runtime): {library}")
    print(f"stand-in model: {path}")
    print(f"shape: {shape} ({model.shape(', ')}; {model.position_bytes()} KV bytes a position)")
    print(f"--longctx-backend=rkllm[library={library},shape={shape}]")
    return 0
