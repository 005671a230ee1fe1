"""A tiny random-weight llama GGUF for the suite's own tests and the docs' example.

``longctx-tiny-gguf tiny.gguf`` writes a llama-architecture model that llama.cpp
loads: 2 layers, 128 wide, 4 query heads over 2 KV heads of 32, a 256-token
vocabulary and a 16384-position training context by default. Its weights are
drawn from a seeded generator (the same seed writes the same bytes) and kept
in float32 unless ``--dtype f16``, so a float32 model can serve as the float
reference of a quantized run. It is a tool of the tests, not a backend: the
``llamacpp`` backend runs it like any other GGUF.

What llama.cpp needs from it:

- the ``llama.*`` hyperparameters, ``llama.context_length`` being the training
  context that the backend reports as the model's limit;
- a tokenizer it accepts: a SentencePiece-style ("llama") vocabulary of
  ``<unk>``, ``<s>``, ``</s>``, then byte tokens ``<0x00>`` ... (llama.cpp looks up
  ``<0x0A>`` for its newline token), then plain ``t{i}`` tokens past 259;
- the tensors by their GGUF names, given in NumPy's row-major order (GGUF
  stores dimensions reversed): ``token_embd`` (vocab, width), per block the
  attention and feed-forward projections and their RMS norms, ``output_norm``
  and ``output`` (vocab, width).

What openvino-genai needs besides (``--tokenizer gpt2 --dtype f16``): its GGUF
reader builds a tokenizer only from a byte-level BPE ("gpt2") vocabulary (the
256 byte tokens in GPT-2's printable spelling, merges, token types, a
pre-tokenizer name; llama.cpp loads it too, as "gpt-2"), and it refuses
all-float32 files ("Unsupported quantization type"): F16 matrices, with the
norms kept float32, it converts.

Scales: projections are drawn with standard deviation 1/sqrt(fan_in) and norms
are ones, so attention scores and logits are of order one and attention
depends on position through RoPE rather than being uniform.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

ARCH = "llama"
DTYPES = ("f32", "f16")
TOKENIZERS = ("llama", "gpt2")
GPT2_EOS = "<|endoftext|>"


def _byte_chars() -> List[str]:
    """GPT-2's printable stand-in for each byte value 0..255 (byte-level BPE's vocabulary base):
    printable Latin-1 bytes stand for themselves, the rest are shifted past 255."""
    kept = list(range(33, 127)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, shifted = {}, 0
    for b in range(256):
        if b in kept:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return [chars[b] for b in range(256)]


def _gpt2_vocab(vocab: int) -> "tuple[List[str], List[str]]":
    """Tokens and merges of a byte-level BPE vocabulary: the 256 byte tokens, merged pairs of
    lower-case letters (each with its merge rule) up to vocab - 1, then the end-of-text token."""
    tokens = _byte_chars()
    letters = "abcdefghijklmnopqrstuvwxyz"
    pairs = [(a, b) for a in letters for b in letters][: vocab - 257]
    merges = [f"{a} {b}" for a, b in pairs]
    tokens += [a + b for a, b in pairs]
    tokens.append(GPT2_EOS)
    return tokens, merges


def _tokens(vocab: int) -> List[str]:
    tokens = ["<unk>", "<s>", "</s>"]
    tokens += [f"<0x{b:02X}>" for b in range(min(256, vocab - 3))]
    tokens += [f"t{i}" for i in range(len(tokens), vocab)]
    return tokens


def write_tiny_gguf(path: "str | Path", *, context: int = 16384, layers: int = 2, width: int = 128,
                    heads: int = 4, kv_heads: int = 2, vocab: Optional[int] = None, ffn: Optional[int] = None,
                    seed: int = 0, dtype: str = "f32", rope_theta: float = 10000.0,
                    tokenizer: str = "llama") -> Path:
    """Write the model to ``path`` and return the path; ValueError names a field that cannot be written."""
    import gguf  # the writer of llama.cpp's own converters (pip install gguf)

    ffn = 2 * width if ffn is None else ffn
    vocab = (256 if tokenizer == "llama" else 320) if vocab is None else vocab
    for name, value in (("context", context), ("layers", layers), ("width", width), ("heads", heads),
                        ("kv_heads", kv_heads), ("ffn", ffn)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r}, but should be a positive integer")
    if width % heads or (width // heads) % 2:
        raise ValueError(f"width={width} must split into {heads} heads of an even size")
    if heads % kv_heads:
        raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer={tokenizer!r}, but should be one of {', '.join(TOKENIZERS)}")
    if tokenizer == "llama" and vocab < 3 + 11:  # the three specials and bytes up to <0x0A>, llama.cpp's newline
        raise ValueError(f"vocab={vocab}, but should be at least 14")
    if tokenizer == "gpt2" and not 257 <= vocab <= 257 + 26 * 26:  # the 256 bytes, merges, end-of-text
        raise ValueError(f"vocab={vocab}, but a gpt2 tokenizer should have 257..{257 + 26 * 26} tokens")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}, but should be one of {', '.join(DTYPES)}")

    head_dim = width // heads
    rng = np.random.default_rng(seed)
    weight = np.float32 if dtype == "f32" else np.float16

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(weight)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)  # norms stay float32, as llama.cpp's converters keep them

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name(f"longctx-tiny-{layers}L-{width}w-s{seed}")
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16))
    writer.add_context_length(context)
    writer.add_embedding_length(width)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)

    if tokenizer == "llama":
        _add_llama_tokenizer(writer, vocab)
    else:
        _add_gpt2_tokenizer(writer, vocab)

    # Embedding rows of unit scale: RMS-normed before the first block anyway.
    writer.add_tensor("token_embd.weight", rng.standard_normal((vocab, width), dtype=np.float32).astype(weight))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones(width))
        writer.add_tensor(f"blk.{i}.attn_q.weight", matrix(heads * head_dim, width))
        writer.add_tensor(f"blk.{i}.attn_k.weight", matrix(kv_heads * head_dim, width))
        writer.add_tensor(f"blk.{i}.attn_v.weight", matrix(kv_heads * head_dim, width))
        writer.add_tensor(f"blk.{i}.attn_output.weight", matrix(width, heads * head_dim))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones(width))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(ffn, width))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", matrix(ffn, width))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", matrix(width, ffn))
    writer.add_tensor("output_norm.weight", ones(width))
    writer.add_tensor("output.weight", matrix(vocab, width))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_llama_tokenizer(writer: "gguf.GGUFWriter", vocab: int) -> None:  # type: ignore[name-defined]
    import gguf

    tokens = _tokens(vocab)
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE if t.startswith("<0x") else gguf.TokenType.NORMAL for t in tokens[3:]]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([int(t) for t in types])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)


def _add_gpt2_tokenizer(writer: "gguf.GGUFWriter", vocab: int) -> None:  # type: ignore[name-defined]
    """The byte-level BPE ("gpt2") tokenizer: the only kind openvino-genai converts from a GGUF
    (it builds its tokenizer from tokens, merges, token types and the pre-tokenizer name)."""
    import gguf

    tokens, merges = _gpt2_vocab(vocab)
    types = [gguf.TokenType.NORMAL] * (vocab - 1) + [gguf.TokenType.CONTROL]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp's name for GPT-2's pre-tokenizer
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab - 1)
    writer.add_eos_token_id(vocab - 1)
    writer.add_add_bos_token(False)


def reference_logits(path: "str | Path", token_ids: Sequence[int], block: int = 512) -> np.ndarray:
    """The float64 forward pass of a llama GGUF this module wrote (llama.cpp's semantics: RMS norm,
    adjacent-pair RoPE, grouped-query causal attention, SwiGLU): the logits of every position,
    (len(token_ids), vocab). The accuracy yardstick of a runtime that converts the file itself;
    queries go in blocks of ``block`` so that a 16K prompt needs no 16K x 16K score matrix."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    weights = {t.name: np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)]).astype(np.float64)
               for t in reader.tensors}

    def scalar(key: str) -> float:
        field = reader.fields[f"{ARCH}.{key}"]
        return field.parts[field.data[0]].tolist()[0]

    layers, heads, kv_heads = int(scalar("block_count")), int(scalar("attention.head_count")), \
        int(scalar("attention.head_count_kv"))
    eps, theta = float(scalar("attention.layer_norm_rms_epsilon")), float(scalar("rope.freq_base"))
    ids = np.asarray(token_ids, dtype=np.int64)
    n, width = len(ids), weights["token_embd.weight"].shape[1]
    head_dim = width // heads
    angles = np.arange(n, dtype=np.float64)[:, None] * theta ** (-np.arange(0, head_dim, 2) / head_dim)
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]

    def norm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def rope(x: np.ndarray) -> np.ndarray:  # adjacent pairs (2i, 2i+1), llama.cpp's LLAMA_ROPE_TYPE_NORM
        out = np.empty_like(x)
        even, odd = x[..., 0::2], x[..., 1::2]
        out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
        return out

    x = weights["token_embd.weight"][ids]
    for i in range(layers):
        w = {name.split(".")[2]: value for name, value in weights.items() if name.startswith(f"blk.{i}.")}
        h = norm(x, w["attn_norm"])
        q = rope((h @ w["attn_q"].T).reshape(n, heads, head_dim))
        k = np.repeat(rope((h @ w["attn_k"].T).reshape(n, kv_heads, head_dim)), heads // kv_heads, axis=1)
        v = np.repeat((h @ w["attn_v"].T).reshape(n, kv_heads, head_dim), heads // kv_heads, axis=1)
        out = np.empty((n, heads, head_dim))
        for start in range(0, n, block):
            stop = min(start + block, n)
            scores = np.einsum("qhd,khd->hqk", q[start:stop], k[:stop]) / np.sqrt(head_dim)
            scores[:, np.arange(stop - start)[:, None] + start < np.arange(stop)[None, :]] = -np.inf
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            out[start:stop] = np.einsum("hqk,khd->qhd", probs / probs.sum(-1, keepdims=True), v[:stop])
        x = x + out.reshape(n, width) @ w["attn_output"].T
        h = norm(x, w["ffn_norm"])
        gate = h @ w["ffn_gate"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ w["ffn_up"].T)) @ w["ffn_down"].T
    return norm(x, weights["output_norm.weight"]) @ weights["output.weight"].T


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="longctx-tiny-gguf",
        description="Write a tiny random-weight llama GGUF that llama.cpp loads (for the llamacpp backend's tests).",
    )
    parser.add_argument("path", help="the .gguf file to write")
    parser.add_argument("--context", type=int, default=16384, help="training context (llama.context_length)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128, help="embedding width")
    parser.add_argument("--heads", type=int, default=4, help="query heads (head size = width / heads)")
    parser.add_argument("--kv-heads", type=int, default=2, help="KV heads")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary (default 256; 320 with --tokenizer gpt2)")
    parser.add_argument("--ffn", type=int, default=None, help="feed-forward width (default 2 x width)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=DTYPES, default="f32", help="weight type of the matrices")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="llama",
                        help="llama (SentencePiece-style) or gpt2 (byte-level BPE: what openvino-genai reads)")
    args = parser.parse_args(argv)
    try:
        path = write_tiny_gguf(args.path, context=args.context, layers=args.layers, width=args.width,
                               heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab, ffn=args.ffn,
                               seed=args.seed, dtype=args.dtype, tokenizer=args.tokenizer)
    except ImportError:
        print("longctx-tiny-gguf: the gguf package is missing; pip install 'pytest-longctx[llamacpp]'",
              file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"longctx-tiny-gguf: {exc}", file=sys.stderr)
        return 2
    vocab = args.vocab or (256 if args.tokenizer == "llama" else 320)
    print(f"{path}: llama, {args.layers} layers, width {args.width}, {args.heads}/{args.kv_heads} heads, "
          f"vocab {vocab}, context {args.context}, {args.dtype}, seed {args.seed}, {args.tokenizer} tokenizer "
          f"({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
