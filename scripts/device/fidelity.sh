#!/usr/bin/env bash
# Device runs of the fidelity issue (one H200; docs/experiments.md records each). PHASE is one of
#   train     GFlash DS2 data (300,000 training showers, seed 7; 50,000 reference showers, seed 1001), then the
#             factorised model (preset ds2-factorised): energy stage E_S s, shape stage S_S s (compiled), fp16 bundle.
#   ablation  equal-budget rows, one after another, each ABL_S s of training alone on the GPU (eager, same data),
#             then 50,000 showers of each with DPM-Solver++(2M) at 32 NFE while time is left (else in evaluate).
#   continue  more training of the shipped (or carried) ds2-factorised bundle: train --init, fresh schedule.
#   evaluate  the main model's rows (MODEL=cont: the continued run's) (ROWS: label=sampler:steps), generated in one compiled process, and every
#             generated file evaluated with the full protocol against the reference, EVAL_JOBS at a time.
#   bash scripts/device/fidelity.sh PHASE          (on the device machine, from the repository root)
# Work lives in runs/device and is kept while the machine stays warm; each phase rebuilds what is missing
# (bundles from .carry/ if they are there). Every phase ends inside the 10-minute call limit.
# CPU smoke run of the whole script (minutes): SMOKE=1 bash scripts/device/fidelity.sh PHASE
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}; W=${WORK:-runs/device}; mkdir -p "$OUT" "$W/gen" "$W/eval" "$W/logs" "$W/export"; OUTABS=$(cd "$OUT" && pwd)
X=$(cd "$W/export" && pwd)     # small results of this phase, packed into OUT/results-PHASE.tgz at the end
PHASE=${1:-}; t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
cf() { python -m calofast "$@"; }
quiet() { "$@" 2> >(tr '\r' '\n' | grep -v -E "shower/s|it/s|s/it|^$" >&2); }
N_TRAIN=300000; N_REF=50000; GEN_STEPS=32; DEV=cuda; EVAL_SET="--min-events 50000"
if [ -n "${SMOKE:-}" ]; then
  N_TRAIN=3000; N_REF=1000; GEN_STEPS=2; DEV=cpu; EVAL_SET="--min-events 1000 --fast"
  E_S=${E_S:-3}; S_S=${S_S:-8}; ABL_S=${ABL_S:-20}; ROWS=${ROWS:-"main-ode2=dpmpp-2m:2"}
  SMOKE_SET="--set train.batch_size=16 --set energy.train.batch_size=256 --set train.warmup_showers=0"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"

data() {
  local workers=$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))
  [ -f $W/train.h5 ] || quiet cf gflash --geometry ds2 --n $N_TRAIN --seed 7 --workers $workers --chunk 2000 --no-compress -o $W/train.h5
  [ -f $W/ref.h5 ] || quiet cf gflash --geometry ds2 --n $N_REF --seed 1001 --workers $workers --chunk 1000 --no-compress -o $W/ref.h5
  # The floor: independent GFlash showers against the reference (row gflash-floor of every table).
  [ -f $W/gen/gflash-floor.h5 ] || quiet cf gflash --geometry ds2 --n $N_REF --seed 2002 --workers $workers --chunk 1000 --no-compress -o $W/gen/gflash-floor.h5
  stamp "data ready"
}

train_run() {   # train_run NAME PRESET ENERGY_S SHAPE_S COMPILE [--set ...]
  local name=$1 preset=$2 es=$3 ss=$4 comp=$5; shift 5
  quiet cf train --data $W/train.h5 --preset "$preset" -o $W/$name --set train.showers=1000000000 \
    --set train.budget_seconds="$ss" --set energy.train.showers=1000000000 --set energy.train.budget_seconds="$es" \
    --set train.compile="$comp" --set train.bundle_dtype=fp16 --set train.checkpoint_showers=4000000 ${SMOKE_SET:-} "$@" \
    > $W/logs/$name.log 2>&1
  stamp "$name trained: $(tail -1 $W/$name/shape/stats.jsonl 2>/dev/null || tail -1 $W/$name/stats.jsonl)"
  (cd $W && cp --parents $name/config.json $(ls $name/stats.jsonl $name/*/stats.jsonl 2>/dev/null) "$X/")
  cp $W/logs/$name.log "$X/"
}

bring_back() {  # bring_back FILE NAME: into OUT in parts of 15 MB (join with cat NAME.part*)
  split -b 15M -d "$1" "$OUTABS/$2.part"
}

gen32() {       # gen32 NAME: 50,000 showers at 32 NFE (DPM-Solver++(2M)), eager
  [ -f $W/gen/$1.h5 ] || quiet python scripts/device/generate_rows.py --model $W/$1/model.safetensors \
    --reference $W/ref.h5 --out $W/gen --n $N_REF "$1=dpmpp-2m:$GEN_STEPS"
}

evaluate() {    # evaluate LABEL: full protocol at 50,000 events, metrics.json into the results
  # Few CPU threads per evaluation: 4 concurrent ones with 16 BLAS/torch threads each oversubscribed the 16 cores
  # and none finished in 515 s (2026-12-02, call 3); eval_table.py ran 92 s per row with 4-6 threads.
  [ -f $W/eval/$1/metrics.json ] || OMP_NUM_THREADS=3 OPENBLAS_NUM_THREADS=3 MKL_NUM_THREADS=3 cf evaluate \
    --generated $W/gen/$1.h5 --reference $W/ref.h5 --geometry ds2 $EVAL_SET --device $DEV --label "$1" \
    -o $W/eval/$1 > $W/logs/eval-$1.log 2>&1
  cp $W/logs/eval-$1.log "$X/"
  if cp $W/eval/$1/metrics.json "$X/eval-$1.json" 2>/dev/null; then
    cp $W/eval/$1/report.html "$X/report-$1.html"; stamp "evaluated $1: $(tail -6 $W/logs/eval-$1.log | tr '\n' ' ')"
  else
    stamp "evaluation of $1 failed"
  fi
}

case "$PHASE" in
  train)
    data
    train_run main ds2-factorised "${E_S:-40}" "${S_S:-400}" true
    bring_back $W/main/model.safetensors ds2-factorised.safetensors
    ;;
  continue)     # more training of the shipped model (train --init): fresh cosine, E_S s energy, S_S s shape
    data
    init=$( [ -f .carry/ds2-factorised.safetensors ] && echo .carry || echo src/calofast/models)/ds2-factorised.safetensors
    quiet cf train --data $W/train.h5 --init "$init" -o $W/cont --set train.showers=1000000000 \
      --set train.budget_seconds="${S_S:-370}" --set train.lr="${LR:-3e-4}" --set train.warmup_showers=200000 \
      --set energy.train.showers=1000000000 --set energy.train.budget_seconds="${E_S:-45}" --set energy.train.lr=5e-4 \
      --set energy.train.warmup_showers=400000 --set train.compile=true --set train.checkpoint_showers=4000000 \
      ${SMOKE_SET:-} > $W/logs/cont.log 2>&1
    stamp "cont trained: $(tail -1 $W/cont/shape/stats.jsonl)"
    (cd $W && cp --parents cont/config.json cont/*/stats.jsonl "$X/"); cp $W/logs/cont.log "$X/"
    bring_back $W/cont/model.safetensors ds2-factorised.safetensors
    ;;
  ablation)
    data
    B=${ABL_S:-120}
    for row in "abl-old ds2-unet 0 $B --set train.batch_size=1024 --set train.lr=4e-4 --set train.warmup_showers=200000 --set train.ema_halflife_showers=500000" \
               "abl-final ds2-factorised 20 $((B - 20))" \
               "abl-nofact ds2-factorised 0 $B --set transform.kind=logit --set network.layer_cond=false"; do
      set -- $row
      [ -f $W/$1/model.safetensors ] || { [ -f .carry/$1.safetensors ] && mkdir -p $W/$1 && cp .carry/$1.safetensors $W/$1/model.safetensors; }
      [ -f $W/$1/model.safetensors ] || train_run "$1" "$2" "$3" "$4" false "${@:5}"
      bring_back $W/$1/model.safetensors $1.safetensors
    done
    for name in abl-old abl-final abl-nofact; do
      [ $(( $(date +%s) - t0 )) -lt 480 ] && gen32 $name
    done
    ;;
  evaluate)
    data
    M=${MODEL:-main}                                 # the run folder whose bundle the ROWS use
    if [ ! -f $W/$M/model.safetensors ]; then        # a fresh machine: the carried or the shipped bundle
      mkdir -p $W/$M; cp "$( [ -f .carry/ds2-factorised.safetensors ] && echo .carry || echo src/calofast/models)/ds2-factorised.safetensors" $W/$M/model.safetensors
    fi
    ROWS=${ROWS:-"main-ode8=dpmpp-2m:8 main-ode16=dpmpp-2m:16 main-ode32=dpmpp-2m:32 main-ode64=dpmpp-2m:64 main-heun32=heun:32 main-sde64=dpmpp-2m-sde:64"}
    ABL=$(cd $W && ls -d abl-* 2>/dev/null)
    { quiet python scripts/device/generate_rows.py --model $W/$M/model.safetensors --reference $W/ref.h5 --out $W/gen \
        --n $N_REF --compile $ROWS; for name in $ABL; do gen32 $name; done; } &
    gen_pid=$!
    labels="gflash-floor $ABL $(for r in $ROWS; do echo -n "${r%%=*} "; done)"
    jobs_max=${EVAL_JOBS:-4}; deadline=${DEADLINE:-570}; pending=$labels
    while [ -n "$pending" ] && [ $(( $(date +%s) - t0 )) -lt $deadline ]; do
      next=""
      for label in $pending; do
        if [ -f $W/gen/$label.h5 ] && [ "$(jobs -rp | wc -l)" -le "$jobs_max" ]; then
          evaluate "$label" &
        elif [ ! -f $W/gen/$label.h5 ] && ! kill -0 $gen_pid 2>/dev/null; then
          stamp "no $label.h5"
        else
          next="$next $label"
        fi
      done
      pending=$next
      [ -n "$pending" ] && sleep 2
    done
    while [ -n "$(jobs -rp)" ] && [ $(( $(date +%s) - t0 )) -lt $deadline ]; do sleep 2; done
    if [ -n "$(jobs -rp)" ]; then
      stamp "deadline: stopping $(jobs -rp | wc -l) jobs"; kill $(jobs -rp) 2>/dev/null; cp $W/logs/eval-*.log "$X/" 2>/dev/null
    fi
    ;;
  *) echo "usage: $0 train|continue|ablation|evaluate"; exit 2 ;;
esac
cat $W/gen/*.json 2>/dev/null > "$X/generation.jsonl"
tar czf "$OUTABS/results-$PHASE.tgz" -C "$X" .
stamp "done"; ls -la "$OUTABS"
