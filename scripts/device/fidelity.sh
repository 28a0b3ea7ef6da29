#!/usr/bin/env bash
# Device runs of the fidelity issue (one H200; docs/experiments.md records each). PHASE is one of
#   train     GFlash DS2 training data (300,000 showers, seed 7), then the
#             factorised model (preset ds2-factorised): energy stage E_S s, shape stage S_S s (compiled), fp16 bundle.
#   ablation  equal-budget rows, one after another, each ABL_S s of training alone on the GPU (eager, same data);
#             writes runs/device/ablation.toml, the study plan that evaluates them (PLAN=... evaluate).
#   evaluate  calofast study PLAN (default studies/ds2-factorised.toml) into runs/device/study-NAME: every row
#             generated, timed and evaluated with the full protocol (EVAL_JOBS evaluations at a time), resumable;
#             stops by DEADLINE s and packs each row's generation.json, metrics.json and report into the results.
#   bash scripts/device/fidelity.sh PHASE          (on the device machine, from the repository root)
# Work lives in runs/device and is kept while the machine stays warm; each phase rebuilds what is missing
# (bundles from .carry/ if they are there). Every phase ends inside the 10-minute call limit.
# CPU smoke run of the whole script (minutes): SMOKE=1 bash scripts/device/fidelity.sh PHASE
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}; W=${WORK:-runs/device}; mkdir -p "$OUT" "$W/logs" "$W/export"; OUTABS=$(cd "$OUT" && pwd)
X=$(cd "$W/export" && pwd)     # small results of this phase, packed into OUT/results-PHASE.tgz at the end
PHASE=${1:-}; t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
cf() { python -m calofast "$@"; }
quiet() { "$@" 2> >(tr '\r' '\n' | grep -v -E "shower/s|it/s|s/it|^$" >&2); }
N_TRAIN=300000; N_REF=50000; GEN_STEPS=32; DEV=cuda; FAST=""
if [ -n "${SMOKE:-}" ]; then
  N_TRAIN=3000; N_REF=300; GEN_STEPS=2; DEV=cpu; FAST="--fast"
  E_S=${E_S:-3}; S_S=${S_S:-8}; ABL_S=${ABL_S:-20}
  SMOKE_SET="--set train.batch_size=16 --set energy.train.batch_size=256 --set train.warmup_showers=0"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"

data() {
  local workers=$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))
  [ -f $W/train.h5 ] || quiet cf gflash --geometry ds2 --n $N_TRAIN --seed 7 --workers $workers --chunk 2000 --no-compress -o $W/train.h5
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
    { echo 'name = "ablation at equal budget: DPM-Solver++(2M) 32 steps"'; echo '[reference]'; echo "n = $N_REF"
      echo 'gflash_seed = 1001'; echo 'floor_seed = 2002'; echo '[defaults]'; echo 'sampler = "dpmpp-2m"'
      echo "steps = $GEN_STEPS"; echo 'batch_size = 10000'
      for name in abl-old abl-final abl-nofact; do
        echo '[[rows]]'; echo "label = \"$name\""; echo "model = \"$W/$name/model.safetensors\""; echo 'family = "ablation"'
      done; } > $W/ablation.toml
    stamp "plan $W/ablation.toml (PLAN=$W/ablation.toml bash $0 evaluate)"
    ;;
  evaluate)
    PLAN=${PLAN:-studies/ds2-factorised.toml}; S=$W/study-$(basename "$PLAN" .toml)
    [ -n "${SMOKE:-}" ] && { FAST="$FAST --events $N_REF --only ${SMOKE_ONLY:-gflash-floor,dpmpp-2m-8}"; S=$S-smoke; }
    # A carried bundle replaces the shipped one in this disposable copy of the tree (plans name models by name).
    [ -z "${SMOKE:-}" ] && [ -f .carry/ds2-factorised.safetensors ] && cp .carry/ds2-factorised.safetensors src/calofast/models/
    cf study "$PLAN" -o $S --device $DEV --eval-jobs ${EVAL_JOBS:-4} --workers $(( $(nproc) > 1 ? $(nproc) - 1 : 1 )) \
      --deadline ${DEADLINE:-520} $FAST 2> >(tr '\r' '\n' | grep -v -E "shower/s|it/s|s/it|^$" >&2) | tee $W/logs/study.log
    stamp "study exit ${PIPESTATUS[0]}"
    (cd $S && cp --parents table.* pareto.png index.html $(ls rows/*/row.json rows/*/generation.json rows/*/eval/metrics.json rows/*/eval/report.html 2>/dev/null) "$X/" 2>/dev/null)
    cp $W/logs/study.log "$X/"
    ;;
  *) echo "usage: $0 train|continue|ablation|evaluate"; exit 2 ;;
esac
tar czf "$OUTABS/results-$PHASE.tgz" -C "$X" .
stamp "done"; ls -la "$OUTABS"
