#!/usr/bin/env bash
# Device call 1 (4 x H100): GFlash training data, the DS2 teacher (DDP), then progressive and
# consistency distillation side by side (2 GPUs each), then a quick look. Every phase has a time
# budget so the whole call ends inside the 10-minute limit; artefacts are copied to $OUT as they appear.
#   bash scripts/device/call1_train.sh            (on the device machine, from the repo root)
# Knobs (environment): TEACHER_S, DISTILL_S (seconds), N_TRAIN, PD_START.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
OUT=${OUT:-out}; W=${WORK:-/tmp/calofast}; mkdir -p "$OUT" "$W"
N_TRAIN=${N_TRAIN:-150000}; TEACHER_S=${TEACHER_S:-270}; DISTILL_S=${DISTILL_S:-150}; PD_START=${PD_START:-64}
BATCH=${BATCH:-1024}; DBATCH=${DBATCH:-512}; N_CHECK=${N_CHECK:-2000}
NG=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; LAUNCH="python -m torch.distributed.run --nproc-per-node"
else
  NG=2; LAUNCH="python -m torch.distributed.run --nproc-per-node"; echo "no GPU: CPU smoke mode"
fi
half=$((NG / 2 > 0 ? NG / 2 : 1))
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

stamp "data: $N_TRAIN GFlash DS2 showers (seed 7)"
python -m calofast gflash --geometry ds2 --n "$N_TRAIN" --seed 7 --workers "$(( $(nproc) - 4 ))" --chunk 1000 \
  --no-compress -o "$W/train.h5" 2>/dev/null || exit 1

python benchmarks/bench_gflash.py --n 3000 --repeats 3 > "$W/bench_gflash.txt" 2>&1 &
stamp "probe: single-GPU throughput"
python -m calofast train --data "$W/train.h5" --preset ds2-unet --set train.max_events=20000 \
  --set train.batch_size=$((BATCH / NG)) --set train.showers=100000000 --set train.max_seconds=12 \
  --set train.log_showers=20000 -o "$W/probe" 2>/dev/null
RATE=$(python -c "import json; r=[json.loads(l) for l in open('$W/probe/stats.jsonl')]; print(int(r[-1]['showers_per_s']))")
SHOWERS=$(python -c "print(max(int($RATE * $NG * 0.9 * $TEACHER_S // $BATCH * $BATCH), $BATCH))")
stamp "probe: $RATE showers/s per GPU -> teacher $SHOWERS showers on $NG GPUs"

stamp "teacher"
$LAUNCH "$NG" -m calofast train --data "$W/train.h5" --preset ds2-unet --set train.batch_size=$BATCH \
  --set train.lr=4e-4 --set train.warmup_showers=200000 --set train.ema_halflife_showers=500000 \
  --set train.showers="$SHOWERS" --set train.checkpoint_showers=2000000 --set train.log_showers=200000 \
  --set train.max_seconds=$((TEACHER_S + 30)) -o "$W/teacher" 2>&1 | grep -v "shower/s\]" | tail -5
cp "$W/teacher/model.safetensors" "$OUT/ds2-teacher-ddpm400.safetensors"
T="$OUT/ds2-teacher-ddpm400.safetensors"

PD_STAGES=$(python -c "import math; print(int(math.log2($PD_START)))")
PD_PER=$(python -c "print(max(int($RATE * $half * 0.9 / 2.4 * $DISTILL_S / $PD_STAGES // $DBATCH * $DBATCH), $DBATCH))")
CD_SH=$(python -c "print(max(int($RATE * $half * 0.9 / 2.8 * $DISTILL_S // $DBATCH * $DBATCH), $DBATCH))")
stamp "distill: PD $PD_START->1 ($PD_PER showers/stage) on $half GPU(s), CD ($CD_SH showers) on $half GPU(s)"
common="--set train.batch_size=$DBATCH --set train.ema_halflife_showers=100000 --set train.checkpoint_showers=100000000 --set train.log_showers=100000"
CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((half - 1))) $LAUNCH "$half" --master-port 29611 -m calofast distill progressive \
  --teacher "$T" --data "$W/train.h5" --start-steps "$PD_START" --to-steps 1 $common \
  --set distill.showers_per_stage="$PD_PER" --set distill.lr=1e-4 --set train.max_seconds=$((DISTILL_S / PD_STAGES + 10)) \
  -o "$W/pd" > "$W/pd.log" 2>&1 &
CUDA_VISIBLE_DEVICES=$(seq -s, $half $((NG - 1))) $LAUNCH "$half" --master-port 29612 -m calofast distill consistency \
  --teacher "$T" --data "$W/train.h5" $common --set distill.cm_showers="$CD_SH" --set distill.cm_steps=40 \
  --set distill.lr=1e-4 --set train.max_seconds=$((DISTILL_S + 10)) -o "$W/cd" > "$W/cd.log" 2>&1 &
wait
grep -v "shower/s\]" "$W/pd.log" | tail -3; grep -v "shower/s\]" "$W/cd.log" | tail -3
for f in "$W"/pd/pd-1step.safetensors "$W"/pd/pd-2step.safetensors "$W"/pd/pd-4step.safetensors \
         "$W"/pd/pd-8step.safetensors "$W"/cd/cd.safetensors; do
  [ -f "$f" ] && cp "$f" "$OUT/ds2-student-$(basename "$f" | sed 's/^pd-/pd-/; s/^cd\./cd-1step./')"
done
tar czf "$OUT/logs.tgz" -C "$W" teacher/stats.jsonl teacher/config.json probe/stats.jsonl pd/config.json \
  cd/stats.jsonl cd/config.json pd.log cd.log $(cd "$W" && ls pd/stage-*/stats.jsonl) 2>/dev/null

stamp "quick look (held-out seed 1001)"
python -m calofast gflash --geometry ds2 --n "$N_CHECK" --seed 1001 --workers 16 --chunk 250 --no-compress -o "$W/ref.h5" 2>/dev/null
models="--model $T:ddim:50 --model $T:dpmpp-2m:20"
for f in "$OUT"/ds2-student-*.safetensors; do models="$models --model $f"; done
DEV=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
python scripts/device/quickcheck.py --reference "$W/ref.h5" --n "$N_CHECK" --device "$DEV" $models 2>&1 | tail -12
cat "$W/bench_gflash.txt"
stamp "done"; ls -la "$OUT"
