#!/usr/bin/env bash
# The closed loop on the bundled tiny model, as the README shows it (about 2.5 minutes on 2 cores):
# serve, three waves of arith traffic (examples/traffic.py), `selfevolve evolve` running ReST-EM
# rounds on what was logged, then the held-out traffic scored: base model against `evolved`.
#   bash examples/evolve_tiny.sh [RUN_ROOT]        (default runs/evolve-tiny; it must not exist)
# SEED=1 draws other questions and samples (the README's numbers are SEED=0).
set -euo pipefail
ROOT=${1:-runs/evolve-tiny}
PORT=${PORT:-8000}
SEED=${SEED:-0}
URL=http://127.0.0.1:$PORT/v1
HERE=$(cd "$(dirname "$0")" && pwd)
[ -e "$ROOT" ] && { echo "$ROOT exists; choose another RUN_ROOT" >&2; exit 2; }
mkdir -p "$ROOT"
selfevolve serve model=tiny port=$PORT verifier=numeric traces=$ROOT/traces.sqlite > "$ROOT/serve.log" 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null' EXIT
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
