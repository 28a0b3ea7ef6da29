#!/usr/bin/env bash
# Device call 3 (4 x H100, ~5 min): the two 400-step DDIM rows that call 2's deadline left out, and the
# raw-network throughput of the 1-step student (eager, channels-last, torch.compile).
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}; W=/tmp/calofast-eval3; mkdir -p "$OUT" "$W"; OUTABS=$(cd "$OUT" && pwd)
python -m calofast gflash --geometry ds2 --n 10000 --seed 1001 --workers 60 --chunk 200 --no-compress -o "$W/ref.h5" 2>/dev/null
(CUDA_VISIBLE_DEVICES=3 timeout 200 python benchmarks/bench_network.py --model src/calofast/models/ds2-student-pd-1step.safetensors \
   --compile > "$OUTABS/bench_network.txt" 2>&1 &)
timeout 290 python scripts/device/eval_table.py --reference "$W/ref.h5" --baseline "$W/ref.h5" --out "$W/res" \
  --rows ddim-400,ddim-eta1-400 --no-bench --deadline 240 --eval-until 285 2>&1 | grep --line-buffered -v "it/s\]"
sleep 2; cat "$OUTABS/bench_network.txt"
cd "$W/res" && tar czf "$OUTABS/metrics3.tgz" gen/*.json $(ls eval/*/metrics.json)
