#!/usr/bin/env bash
# The closed loop on the bundled tiny model, as the README shows it (about 2.5 minutes on 2 cores):
# serve, three waves of arith traffic (examples/traffic.py), `selfevolve evolve` running ReST-EM
# rounds on what was logged, then the held-out traffic scored: base model against `evolved`.
#   bash examples/evolve_tiny.sh [RUN_ROOT]        (default runs/evolve-tiny; it must not exist)
# SEED=1 draws other questions and samples (the README's numbers are SEED=0).
# VLLM_PYTHON=.venv-vllm/bin/python (bench/vllm-env.sh) runs the same loop behind a real vLLM: `vllm serve`
# of tiny on PORT+1, `selfevolve serve model=<its URL>` in front of it as the gateway on PORT.
set -euo pipefail
ROOT=${1:-runs/evolve-tiny}
PORT=${PORT:-8000}
SEED=${SEED:-0}
URL=http://127.0.0.1:$PORT/v1
HERE=$(cd "$(dirname "$0")" && pwd)
[ -e "$ROOT" ] && { echo "$ROOT exists; choose another RUN_ROOT" >&2; exit 2; }
mkdir -p "$ROOT"
ENGINE=tiny
if [ -n "${VLLM_PYTHON:-}" ]; then
  TINY=$(python -c "from selfevolve.models import resolve_model_path; print(resolve_model_path('tiny'))")
  VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_CPU_KVCACHE_SPACE=1 "$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server \
    --model "$TINY" --host 127.0.0.1 --port $((PORT + 1)) --dtype float32 --enable-lora --max-lora-rank 16 \
    --max-loras 4 --max-model-len 256 --seed 0 --scheduling-policy priority > "$ROOT/vllm.log" 2>&1 &
  VLLM=$!
  trap 'kill $VLLM 2>/dev/null' EXIT
  until curl -sf http://127.0.0.1:$((PORT + 1))/health > /dev/null; do
    kill -0 $VLLM 2>/dev/null || { tail -20 "$ROOT/vllm.log" >&2; exit 1; }
    sleep 2
  done
  ENGINE=http://127.0.0.1:$((PORT + 1))/v1
fi
selfevolve serve model=$ENGINE port=$PORT verifier=numeric traces=$ROOT/traces.sqlite > "$ROOT/serve.log" 2>&1 &
SERVE=$!
trap 'kill $SERVE ${VLLM:-} 2>/dev/null' EXIT
until curl -sf http://127.0.0.1:$PORT/health > /dev/null; do
  kill -0 $SERVE 2>/dev/null || { cat "$ROOT/serve.log" >&2; exit 1; }
  sleep 1
done
python "$HERE/traffic.py" send --url $URL --n 800 --offset 0 --seed $SEED
selfevolve evolve model=$URL traces=$ROOT/traces.sqlite recipe=rest_em every=500 rounds=3 poll_s=2 val_fraction=0.25 \
  run_dir=$ROOT/evolve > "$ROOT/evolve.log" 2>&1 &
EVOLVE=$!
for k in 1 2; do   # the next wave once round k-1 is recorded: answered by whatever is served then
  until python -c "import json,sys; sys.exit(json.load(open('$ROOT/evolve/state.json'))['round'] < $k)" 2>/dev/null; do
    kill -0 $EVOLVE 2>/dev/null || { tail -5 "$ROOT/evolve.log" >&2; exit 1; }
    sleep 2
  done
  python "$HERE/traffic.py" send --url $URL --n 800 --offset $((800 * k)) --seed $SEED
done
wait $EVOLVE
grep "^round" "$ROOT/evolve.log"
python "$HERE/traffic.py" score --url $URL --traces $ROOT/traces.sqlite --seed $SEED
selfevolve report "$ROOT/evolve" > /dev/null && echo "report: $ROOT/evolve/report/report.html"
