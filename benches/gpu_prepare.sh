#!/usr/bin/env bash
# Prepares, on this (CPU-only) machine, what benches/gpu_check.sh needs on the GPU
# machine, in .gpu/ (git-ignored; at most 64 MiB travel there):
#   - the CUDA wheel (scripts/build-cuda-wheel) and the one pure-Python dependency
#     that machine's image lacks for `zse.Engine` and `zse convert` (platformdirs);
#   - the SmolLM2 tokenizer and chat template, taken from the cached default model;
#   - the tiny random Qwen2 reference model and its llama.cpp results.
# Then, with the device tool: carry [".gpu"], command "bash benches/gpu_check.sh".
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/build-cuda-wheel
rm -rf .gpu && mkdir -p .gpu
cp "$(ls -t dist/zse-*-linux_x86_64.whl | head -n 1)" .gpu/
venv="${ZSE_VENV:-.venv}"
"$venv/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    -d .gpu "platformdirs>=3"
cp ../shared/reference/qwen2-tiny-random-f32.gguf ../shared/reference/*.json .gpu/
"$venv/bin/python" - <<'PY'
import json
from pathlib import Path

from gguf import GGUFReader

import zse

reader = GGUFReader(zse.pull())
def text(key: str) -> str:
    field = reader.fields[key]
    return bytes(field.parts[field.data[0]]).decode()

out = Path(".gpu")
(out / "tokenizer.json").write_text(text("zse.tokenizer_json"))
config = {
    "chat_template": text("zse.chat_template"),
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
}
(out / "tokenizer_config.json").write_text(json.dumps(config))
PY
du -sh .gpu && ls -l .gpu
