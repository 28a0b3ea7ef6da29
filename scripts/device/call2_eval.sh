#!/usr/bin/env bash
# Device run (any number of GPUs; made on 2 x H200): the evaluation table of the shipped DS2 teacher and students against a held-out
# GFlash reference of N_EVAL (default 50,000) showers. Needs .carry/ (pd-8 and cd students).
#   bash scripts/device/call2_eval.sh        (on the device machine, from the repo root)
# Re-entrant: run it again (same machine, or with the last metrics.tgz at .carry/eval50k/metrics.tgz)
# and it goes on with the rows and 10k-chunks still missing. Budget per call: ~575 s.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}; W=${WORK:-/tmp/calofast-eval}; N=${N_EVAL:-50000}; mkdir -p "$OUT" "$W/res"
OUTABS=$(cd "$OUT" && pwd); t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -n "${GFLASH_BENCH:-}" ]; then           # one core of this host, before anything else loads it
  lscpu | grep -m1 "Model name"
  python benchmarks/bench_gflash.py --n 3000 --repeats 5 | tee "$OUTABS/gflash_bench.txt"
  python benchmarks/bench_gflash.py --geometry ds3 --n 1000 --repeats 3 | tee -a "$OUTABS/gflash_bench.txt"
fi
[ -f .carry/eval50k/metrics.tgz ] && tar xzf .carry/eval50k/metrics.tgz -C "$W/res"
[ -f "$W/ref.h5" ] || python -m calofast gflash --geometry ds2 --n "$N" --seed 1001 --workers 60 --chunk 200 --no-compress -o "$W/ref.h5" 2>/dev/null
[ -f "$W/base.h5" ] || python -m calofast gflash --geometry ds2 --n "$N" --seed 2002 --workers 60 --chunk 200 --no-compress -o "$W/base.h5" 2>/dev/null
left=$(( ${BUDGET:-575} - ($(date +%s) - t0) ))
echo "[$(( $(date +%s) - t0 ))s] reference and baseline ready; ${left} s left"
timeout $(( left - 5 )) python scripts/device/eval_table.py --reference "$W/ref.h5" --baseline "$W/base.h5" --out "$W/res" \
  --n "$N" --compile --deadline $(( left - ${EVAL_TAIL:-150} )) --eval-until $(( left - 15 )) --results-tar "$OUTABS/metrics.tgz" \
  2>&1 | grep --line-buffered -v "it/s\]" | tee "$OUTABS/eval_log.txt"
cd "$W/res" && tar czf "$OUTABS/reports.tgz" $(ls eval/*/report.html eval/*/*.png 2>/dev/null) 2>/dev/null
echo "[$(( $(date +%s) - t0 ))s] done"; ls -la "$OUTABS"
