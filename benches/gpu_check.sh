#!/usr/bin/env bash
# ZSE on an NVIDIA GPU, in one run on the lent GPU machine (no network, no Rust;
# Python 3.12 with torch and transformers). Prepare .gpu/ here first with
# benches/gpu_prepare.sh, then run this there with .gpu carried. It prints, and
# writes to $OUT/gpu_check.json (or .gpu/out):
#   1. greedy tokens of the tiny Qwen2 reference on the GPU against the CPU engine;
#   2. a random-weight Llama of ~1B parameters built on the spot (fp16), converted
#      with `zse convert --quant fp16`;
#   3. zse's single-stream decode tokens/s, aggregate tokens/s at 32 streams, and
#      GPU memory;
#   4. transformers' decode tokens/s on the same weights on the same GPU;
#   5. decode's share of the memory bandwidth (weights read per token x tokens/s,
#      over a device-to-device copy's bandwidth measured in the same run).
set -euo pipefail
cd "$(dirname "$0")/.."
carry="$PWD/.gpu"
out="${OUT:-$carry/out}"
work="${ZSE_GPU_WORK:-/tmp/zse-gpu}"
mkdir -p "$out" "$work"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$work/site" "$carry"/*.whl
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
# The wheel links to CUDA 13's cuBLAS, cuRAND, NVRTC and runtime: PyTorch's own copies
# (nvidia-* packages), and the driver's libcuda.
nvidia="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')"
libs="$(find "$nvidia" -name 'lib*.so*' -printf '%h\n' | sort -u | paste -sd:)"
export LD_LIBRARY_PATH="$libs:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import zse; print("zse", zse.__version__, "imports; auto device:", zse._core.resolve_device("auto"))'

check="benches/gpu_check.py"
python3 "$check" small "$carry" "$out"
python3 "$check" build "$carry" "$work/llama-1b"
python3 -m zse convert "$work/llama-1b" "$work/llama-1b.zse" --quant fp16
python3 "$check" zse "$work/llama-1b.zse" "$out"
python3 "$check" hf "$work/llama-1b" "$out"
python3 "$check" report "$out"
