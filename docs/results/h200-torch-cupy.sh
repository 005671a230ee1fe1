#!/usr/bin/env bash
# The torch backend on CUDA beside the CuPy backend on one lent H200 (the `device` tool):
# the conformance suite on both, then longctx-bench side by side, 4K to 64K positions.
# Run from the checkout with the project's wheel in .whl/ (pip wheel --no-deps -w .whl .):
# the machine has torch, cupy, pytest, pytest-xdist and no network.
set -u
out=${OUT:-/tmp/out}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, cupy, numpy; print('torch', torch.__version__, 'cupy', cupy.__version__, 'numpy', numpy.__version__)"
cd /tmp  # the installed suite, as a user runs it
timeout "${SUITE_S:-280}" python3 -m pytest -p no:cacheprovider -q -rfEs -n 8 \
    --longctx-backend='torch[device=cuda]' --longctx-backend=cupy \
    --longctx-shape=qwen3-0.6b --longctx-positions=4096,16384 --longctx-seed=1 \
    --longctx-report="$out/h200-suite.json" 2>&1 | tail -40 | tee "$out/suite.txt"
timeout "${BENCH_S:-220}" python3 -c "import sys; from pytest_longctx.tools.bench import main; sys.exit(main())" \
    --backend cupy --backend 'torch[device=cuda:0]' --shape qwen3-0.6b \
    --positions 4096,8192,16384,32768,65536 --kv-dtype float16 --repeats 3 2>&1 | tee "$out/bench.md"
