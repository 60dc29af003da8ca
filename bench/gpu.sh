#!/usr/bin/env bash
# The GPU check, in one call, on a machine with torch, transformers and peft preinstalled and no
# network (README: "On your own model, and on a GPU" says how to fill the wheel folder):
#   1. install the project's other dependencies from the wheel folder ($WHEELS, default .whl/);
#   2. pytest -m gpu (CUDA/bf16 learner, verified sync in bf16, a SCoRe run), and the vllm tier where
#      bench/vllm-env.sh made .venv-vllm;
#   3. one bf16 SCoRe run on tiny on CUDA with verified sync (its summary and metrics kept);
#   4. bench/bench_gpu.py: memory and throughput of a whole run on a random Qwen2.5-0.5B-shaped model.
# Everything it measures goes to $OUT (default gpu-out/): gpu.json, score-summary.json, logs.
# `bench/gpu.sh --check` runs only what needs no GPU (CI: tests/test_bench_gpu.py).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SELFEVOLVE_QUIET=1

# 1. the dependencies torch/transformers/peft do not bring, from the local folder only
if ! python -c "import selfevolve, fastapi, math_verify, langchain_core, openai, matplotlib" 2>/dev/null; then
  [ -d "$WHEELS" ] || { echo "gpu.sh: no wheel folder $WHEELS (see the README's GPU section)" >&2; exit 2; }
  python -m pip install -q --no-index --find-links "$WHEELS" --no-deps -r bench/gpu-requirements.txt
  python -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
python - <<'EOF' | tee "$OUT/versions.txt"
import sys, torch, transformers, peft
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}, cuda {torch.version.cuda}, device "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
EOF
if [ "${1:-}" = "--check" ]; then
  python -c "import selfevolve.cli, selfevolve.policies.vllm" && echo "gpu.sh --check: imports ok"
  exit 0
fi
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" \
  || { echo "gpu.sh: no CUDA device here" >&2; exit 3; }

# 2. the gpu-marked tests; the vllm tier too where bench/vllm-env.sh made .venv-vllm
python -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest-gpu.log"
if [ -x .venv-vllm/bin/python ]; then
  SELFEVOLVE_VLLM_PYTHON="$PWD/.venv-vllm/bin/python" python -m pytest -m vllm -q -p no:cacheprovider tests 2>&1 \
    | tee "$OUT/pytest-vllm.log"
fi

# 3. one bf16 SCoRe run on tiny, on CUDA, verified sync at every update
rm -rf "$OUT/score-run"
selfevolve run recipe=score device=cuda dtype=bfloat16 stage1_steps=2 stage2_steps=2 batch_tasks=32 \
  eval_limit=64 val_limit=32 run_dir="$OUT/score-run" 2>&1 | tail -20 | tee "$OUT/score.log"
cp "$OUT/score-run/summary.json" "$OUT/score-summary.json"
cp "$OUT/score-run/metrics.jsonl" "$OUT/score-metrics.jsonl"
rm -rf "$OUT/score-run"

# 4. memory and throughput on a ~0.5B Llama-shaped model (random weights)
python bench/bench_gpu.py --out "$OUT/gpu.json"
echo "gpu.sh: done; results in $OUT"
