#!/usr/bin/env bash
# Device call 2 (4 x H100): the evaluation table of the shipped DS2 teacher and students against a
# held-out GFlash reference, plus the timing protocol (calofast bench). Needs .carry/ (pd-8, cd students).
#   bash scripts/device/call2_eval.sh        (on the device machine, from the repo root)
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}; W=${WORK:-/tmp/calofast-eval}; N=${N_EVAL:-10000}; mkdir -p "$OUT" "$W"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
t0=$(date +%s)
python -m calofast gflash --geometry ds2 --n "$N" --seed 1001 --workers 60 --chunk 200 --no-compress -o "$W/ref.h5" 2>/dev/null
python -m calofast gflash --geometry ds2 --n "$N" --seed 2002 --workers 60 --chunk 200 --no-compress -o "$W/base.h5" 2>/dev/null
echo "[$(( $(date +%s) - t0 ))s] reference and baseline ready"
timeout ${EVAL_TIMEOUT:-530} python scripts/device/eval_table.py --reference "$W/ref.h5" --baseline "$W/base.h5" \
  --out "$W/res" --deadline ${DEADLINE:-320} --eval-until ${EVAL_UNTIL:-470} ${NO_BENCH:+--no-bench} 2>&1 | grep --line-buffered -v "it/s\]" | tee "$OUT/eval_log.txt"
OUTABS=$(cd "$OUT" && pwd); cd "$W/res" && tar czf "$OUTABS/metrics.tgz" gen/*.json $(ls eval/*/metrics.json) $(ls bench.json 2>/dev/null)
tar czf "$OUTABS/reports.tgz" $(ls eval/*/report.html eval/*/*.png 2>/dev/null)
echo "[$(( $(date +%s) - t0 ))s] done"; ls -la "$OUTABS"
