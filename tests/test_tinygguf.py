"""The tiny GGUF writer: what it writes is what llama.cpp's reader and the llamacpp backend read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed: pip install -e '.[llamacpp]'")

from pytest_longctx.tools.tinygguf import main, write_tiny_gguf  # noqa: E402


def _field(reader: "gguf.GGUFReader", key: str):  # type: ignore[name-defined]
    field = reader.fields[key]
    return field.parts[field.data[0]].tolist()[0] if len(field.data) == 1 else None


def test_a_seed_writes_the_same_bytes_and_another_seed_other_weights(tmp_path: Path) -> None:
    a = write_tiny_gguf(tmp_path / "a.gguf", context=1024, seed=3)
    b = write_tiny_gguf(tmp_path / "b.gguf", context=1024, seed=3)
    c = write_tiny_gguf(tmp_path / "c.gguf", context=1024, seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes() and a.stat().st_size == c.stat().st_size


def test_metadata_and_tensors_are_a_llama_model(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", context=4096, layers=3, width=64, heads=4, kv_heads=1, vocab=300)
    reader = gguf.GGUFReader(str(path))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    assert _field(reader, "llama.context_length") == 4096
    assert _field(reader, "llama.block_count") == 3
    assert _field(reader, "llama.attention.head_count_kv") == 1
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 300
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 3 * 9 + 1
    # GGUF lists dimensions innermost first: (width, vocab) for a (vocab, width) NumPy array.
    assert tuple(tensors["token_embd.weight"].shape) == (64, 300)
    assert tuple(tensors["blk.0.attn_k.weight"].shape) == (64, 16)
    assert tensors["blk.2.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_f16_weights_keep_norms_in_float32(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(str(write_tiny_gguf(tmp_path / "h.gguf", dtype="f16")))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    weights = np.asarray(next(t for t in reader.tensors if t.name == "output.weight").data, dtype=np.float32)
    assert np.isfinite(weights).all() and 0.05 < weights.std() < 0.2  # 1/sqrt(128)


def test_the_command_writes_and_says_what(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path / "tiny.gguf"), "--context", "2048", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path / 'tiny.gguf'}: llama, 2 layers, width 128, 4/2 heads, vocab 256, "
                          f"context 2048, f32, seed 7")


@pytest.mark.parametrize("args, message", [
    (["--heads", "3"], "width=128 must split into 3 heads"),
    (["--kv-heads", "3"], "heads=4 is not a multiple of kv_heads=3"),
    (["--vocab", "8"], "vocab=8, but should be at least 14"),
    (["--context", "0"], "context=0, but should be a positive integer"),
])
def test_the_command_refuses_a_shape_it_cannot_write(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    args: list, message: str) -> None:
    assert main([str(tmp_path / "x.gguf"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


def test_a_gpt2_tokenizer_is_byte_level_bpe_with_merges(tmp_path: Path) -> None:
    """What openvino-genai's GGUF reader needs: tokenizer model "gpt2", the 256 byte tokens in GPT-2's
    printable spelling, merges whose halves are tokens and whose joins are tokens, one control token."""
    path = write_tiny_gguf(tmp_path / "g.gguf", dtype="f16", tokenizer="gpt2", vocab=300)
    reader = gguf.GGUFReader(str(path))

    def strings(key: str) -> list:
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    assert strings("tokenizer.ggml.model") == ["gpt2"]
    tokens, merges = strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges")
    assert len(tokens) == 300 and len(set(tokens)) == 300
    assert tokens[ord("a")] == "a" and tokens[ord(" ")] == "Ġ" and tokens[10] == "Ċ"  # GPT-2's byte spelling
    assert len(merges) == 300 - 257 and all(a in tokens and b in tokens and a + b in tokens
                                            for a, b in (m.split(" ") for m in merges))
    types = [int(reader.fields["tokenizer.ggml.token_type"].parts[i][0])
             for i in reader.fields["tokenizer.ggml.token_type"].data]
    assert types.count(int(gguf.TokenType.CONTROL)) == 1 and tokens[types.index(3)] == "<|endoftext|>"
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 299


def test_the_default_vocabulary_follows_the_tokenizer(tmp_path: Path) -> None:
    reader = gguf.GGUFReader(str(write_tiny_gguf(tmp_path / "d.gguf", tokenizer="gpt2")))
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 320
    with pytest.raises(ValueError, match="a gpt2 tokenizer should have 257..933 tokens"):
        write_tiny_gguf(tmp_path / "x.gguf", tokenizer="gpt2", vocab=256)
    with pytest.raises(ValueError, match="tokenizer='bpe', but should be one of llama, gpt2"):
        write_tiny_gguf(tmp_path / "y.gguf", tokenizer="bpe")
