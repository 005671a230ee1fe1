"""longctx-bench: figures per backend and length, fractions of the limits probed beside them,
open timed apart, JSON that the docs' tables are made from, floors and progress."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from pytest_longctx.shapes import parse_shape
from pytest_longctx.tools import bench

TINY = "n_layers=2,n_heads=4,n_kv_heads=2,head_dim=64"


def _run(tmp_path: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple:
    out = tmp_path / "bench.json"
    status = bench.main(["--shape", TINY, "--positions", "1024", "--chunk", "256", "--repeats", "2",
                         "--no-progress", "--json", str(out), *extra])
    return status, capsys.readouterr().out, json.loads(out.read_text())


def test_every_case_reports_open_apart_and_fractions_of_its_limits(tmp_path: Path, capsys) -> None:
    status, printed, doc = _run(tmp_path, capsys, "--kv-dtype", "float16,q8_0,fp8_e4m3", "--reference")
    assert status == 0
    cases = {c["kv_dtype"]: c for c in doc["cases"]}
    assert cases["fp8_e4m3"]["status"] == "not supported" and "fp8_e4m3" in cases["fp8_e4m3"]["reason"]
    for dtype in ("float16", "q8_0"):
        case = cases[dtype]
        assert case["status"] == "ok" and case["positions"] == 1024
        figures = {f["workload"].split(" (")[0]: f for f in case["figures"]}
        assert figures["open"]["unit"] == "ms" and figures["open"]["median"] > 0
        assert figures["first prefill chunk after open"]["median"] > 0
        for name, of in (("prefill-style fill", "copy"), ("decode attention, all layers", "read"),
                         ("prefill attention", "matmul")):
            assert figures[name]["of"] == of and 0 < figures[name]["fraction"] < 100, figures[name]
            assert figures[name]["passed"] is None  # no floor asked
        roof = case["roofline"]
        assert roof["copy_gbps"] > 0 and roof["read_gbps"] > 0 and roof["matmul_gflops"] > 0
    assert "float16 @ 1024 positions" in printed and "q8_0 @ 1024 positions" in printed
    assert "open (allocate + prepare)" in printed and "of copy" in printed and "of matmul" in printed
    assert "reference decode query, 1 layer (float64)" in printed
    table = bench.markdown(doc)
    assert table.count("\n| cpu | ") == 3 and "not supported" in table and "of read" in table


def test_a_fraction_under_its_floor_is_marked_and_fails_the_run(tmp_path: Path, capsys) -> None:
    status, printed, doc = _run(tmp_path, capsys, "--kv-dtype", "float32", "--decode-floor", "10")
    assert status == 1 and "BELOW >= 1000%" in printed
    figures = {f["workload"]: f for f in doc["cases"][0]["figures"]}
    assert figures["decode attention, all layers"]["passed"] is False


def test_bad_arguments_are_one_line_errors(capsys) -> None:
    for argv, message in ((["--decode-floor", "-1"], "should be a fraction"),
                          (["--kv-dtype", "float8"], "kv dtype float8"),
                          (["--markdown", "/nonexistent.json"], "--markdown /nonexistent.json")):
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert message in capsys.readouterr().err


def test_prefill_attention_counts_the_keys_each_query_sees() -> None:
    spec = parse_shape(TINY).replace(max_positions=100)
    for window in (None, 7):
        s = spec.replace(sliding_window=window)
        seen = sum(min(p + 1, window or p + 1) for p in range(100 - 30, 100))
        assert bench.prefill_attention_flops(s, 100, 30) == 4 * s.n_heads * s.head_dim * seen


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_rewrites_one_line_on_a_terminal_and_logs_lines_elsewhere() -> None:
    terminal = _Terminal()
    shown = bench.Progress(True, terminal)
    shown.update("chunk 1/2 of a long case")
    shown.update("chunk 2/2")
    shown.clear()
    text = terminal.getvalue()
    assert text.startswith("\rchunk 1/2 of a long case\rchunk 2/2") and "\n" not in text
    assert text.endswith("\r" + " " * len("chunk 2/2") + "\r")
    log = io.StringIO()
    every = bench.Progress(True, log, every=0.0)
    every.update("a")
    every.update("b")
    assert log.getvalue() == "a\nb\n"
    quiet = io.StringIO()
    bench.Progress(False, quiet).update("nothing")
    assert quiet.getvalue() == ""
