#!/usr/bin/env bash
# Device runs of the fidelity issue (one H200; docs/experiments.md records each). PHASE is one of
#   train     GFlash DS2 training data (300,000 showers, seed DATA_SEED, default 7), then the
#             factorised model (preset ds2-factorised): energy stage E_S s, shape stage S_S s (compiled), fp16 bundle.
#   ablation  equal-budget rows ROWS="abl-final abl-deq ..." (row_args below: one ingredient changed each), one
#             after another, each ABL_S s of training alone on the GPU (eager, same data; factorised rows give ABL_E
#             of it to the energy stage), then their study plan evaluated in the same call (FLOOR=1 adds the floor);
#             ABL_PAR=1 trains the rows at once, compiled, for ABL_S s of shared GPU each, and stops (then `rows`).
#   shortcut  (few-step issue) a shortcut student of the shipped teacher (calofast distill shortcut; SC_INIT=.carry/
#             ds2-shortcut.safetensors trains a carried one further), SC_S s compiled, fp16 bundle, into runs/device/
#             $CONT (default sc; SETS="--set distill.sc_loss=meanflow" for MeanFlow, "--targets-from ds2-factorised"
#             for the teacher's ODE as target source of a student trained further); ONLY=row,row then evaluates
#             those rows of studies/ds2-shortcut.toml with it in the same call.
#   speed     (few-step issue) pipeline profiles and calofast bench runs (PROFILES, BENCHES: ';'-separated argument
#             lists), then ONLY=row,row of PLAN (default studies/ds2-shortcut.toml).
#   continue  more training of the shipped model (train --init) into runs/device/$CONT (default cont); several
#             continues with different CONT and SETS may run at once (start them after `data`)
#   data      the training data alone (so that concurrent phases do not race for it)
#   tvs       (study issue) T versus S: studies/ds2-T-vs-S.toml on the runs t400 t1000 t4000 (trained as ablation
#             rows): strided DDPM and DDIM at S = 50 and 200, in one study, each classifier with three seeds
#   ds3       (DS3 issue) GFlash DS3 training data (N_DS3, default 100,000) and the ds3-factorised preset trained
#             into runs/device/$CONT (default ds3), E_S + S_S s, compiled; evaluate it with RUNS=ds3 ... rows
#   probe     (diagnostic) GFlash reference (seed 1001) and floor (seed 2002), 50,000 showers of MODEL (default the
#             shipped teacher, DPM-Solver++(2M) 32) from the reference's energies, then scripts/classifier_probe.py
#   rows      evaluate the bundles of finished runs RUNS="f0 f1" (runs/device/NAME/model.safetensors, else
#             .carry/NAME.safetensors) with the full protocol at DPM-Solver++(2M) 32 (or SAMPLINGS), in one study
#   evaluate  calofast study PLAN (default studies/ds2-factorised.toml) into runs/device/study-NAME: every row
#             generated, timed and evaluated with the full protocol (EVAL_JOBS evaluations at a time), resumable;
#             stops by DEADLINE s and packs each row's generation.json, metrics.json and report into the results.
#   bash scripts/device/fidelity.sh PHASE          (on the device machine, from the repository root)
# Work lives in runs/device and is kept while the machine stays warm; each phase rebuilds what is missing
# (bundles from .carry/ if they are there). Every phase ends inside the 10-minute call limit.
# CPU smoke run of the whole script (minutes): SMOKE=1 bash scripts/device/fidelity.sh PHASE
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
PHASE=${1:-}; t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
# small results of this phase, packed into OUT/results-PHASE[-CONT].tgz at the end: one folder per phase and CONT,
# so that phases running at once (or one after another on a warm machine) do not pack each other's rows
OUT=${OUT:-out}; W=${WORK:-runs/device}; X=$W/export-${PHASE:-none}${CONT:+-$CONT}
rm -rf "$X"; mkdir -p "$OUT" "$W/logs" "$X"; OUTABS=$(cd "$OUT" && pwd); X=$(cd "$X" && pwd)
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
  [ -f $W/train.h5 ] || quiet cf gflash --geometry ds2 --n $N_TRAIN --seed ${DATA_SEED:-7} --workers $workers --chunk 2000 --no-compress -o $W/train.h5
  stamp "data ready"
}

train_run() {   # train_run NAME PRESET ENERGY_S SHAPE_S COMPILE [--set ...]
  local name=$1 preset=$2 es=$3 ss=$4 comp=$5; shift 5
  quiet cf train --data ${DATA:-$W/train.h5} --preset "$preset" -o $W/$name --set train.showers=1000000000 \
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

run_study() {   # run_study PLAN DEADLINE_S [ONLY]: calofast study into W/study-NAME (resumable), results into X
  local plan=$1 S=$W/study-$(basename "$1" .toml) fast="$FAST${3:+ --only $3}"
  [ -n "${SMOKE:-}" ] && { fast="$fast --events $N_REF"; S=$S-smoke; }
  cf study "$plan" -o $S --device $DEV --eval-jobs ${EVAL_JOBS:-4} --workers $(( $(nproc) > 1 ? $(nproc) - 1 : 1 )) \
    --deadline $2 $fast 2> >(tr '\r' '\n' | grep -v -E "shower/s|it/s|s/it|^$" >&2) | tee -a $W/logs/study.log
  stamp "study exit ${PIPESTATUS[0]}"
  (cd $S && cp --parents table.* pareto.png index.html $(ls rows/*/row.json rows/*/generation.json rows/*/eval/metrics.json rows/*/eval/report.html 2>/dev/null) "$X/" 2>/dev/null)
  cp $W/logs/study.log "$X/"
}

rows_plan() {   # rows_plan TITLE RUN...: a study plan of the runs' bundles at DPM-Solver++(2M) GEN_STEPS (rows RUN), or
                # at each SAMPLER:STEPS of SAMPLINGS (rows RUN-SAMPLER-STEPS), compiled
  local title=$1 s; shift
  echo "name = \"$title: ${SAMPLINGS:-DPM-Solver++(2M) $GEN_STEPS steps}\""; echo 'timing_repeats = 0'
  [ -n "${CLS_SEEDS:-}" ] && echo "classifier_seeds = $CLS_SEEDS"
  echo '[reference]'; echo "n = $N_REF"; echo 'gflash_seed = 1001'; [ -n "${FLOOR:-}" ] && echo 'floor_seed = 2002'
  echo '[defaults]'; echo 'sampler = "dpmpp-2m"'; echo "steps = $GEN_STEPS"; echo 'batch_size = 10000'
  [ -z "${SMOKE:-}" ] && echo 'compile = true'
  for name in "$@"; do for s in ${SAMPLINGS:-default}; do
    echo '[[rows]]'; echo "model = \"$(cd $W/$name && pwd)/model.safetensors\""
    if [ "$s" = default ]; then echo "label = \"$name\""; echo 'family = "ablation"'
    else echo "label = \"$name-${s%:*}-${s#*:}\""; echo "sampler = \"${s%:*}\""; echo "steps = ${s#*:}"; echo "family = \"$name\""; fi
  done; done
}

case "$PHASE" in
  train)
    data
    train_run main ds2-factorised "${E_S:-40}" "${S_S:-400}" true
    bring_back $W/main/model.safetensors ds2-factorised.safetensors
    ;;
  data) data; exit 0 ;;
  ds3)          # (DS3 issue) GFlash DS3 training data (N_DS3 showers, default 100,000 = 16 GB float32, seed DATA_SEED),
                # then the ds3-factorised preset (SETS may change it): energy stage E_S s, shape stage S_S s, compiled
    n=${N_DS3:-100000}; comp=true; [ -n "${SMOKE:-}" ] && { n=600; comp=false; }
    [ -f $W/train-ds3.h5 ] || quiet cf gflash --geometry ds3 --n $n --seed ${DATA_SEED:-7} \
      --workers $(( $(nproc) > 1 ? $(nproc) - 1 : 1 )) --chunk 2000 --no-compress -o $W/train-ds3.h5
    stamp "ds3 data ready ($n showers)"
    DATA=$W/train-ds3.h5 train_run ${CONT:-ds3} ds3-factorised "${E_S:-30}" "${S_S:-400}" $comp ${SETS:-}
    [ -z "${NO_BACK:-}" ] && bring_back $W/${CONT:-ds3}/model.safetensors ${CONT:-ds3}.safetensors
    ;;
  continue)     # more training of the shipped model (train --init): fresh cosine, E_S s energy, S_S s shape;
                # ONLY=row,row then evaluates those rows of studies/ds2-factorised.toml with the continued model
                # STAGES=energy trains only that stage (SETS="--set energy.network.width=512" may change its network)
    data
    init=${INIT:-$( [ -f .carry/ds2-factorised.safetensors ] && echo .carry || echo src/calofast/models)/ds2-factorised.safetensors}
    C=${CONT:-cont}
    quiet cf train --data $W/train.h5 --init "$init" -o $W/$C --set train.showers=1000000000 \
      --set train.budget_seconds="${S_S:-370}" --set train.lr="${LR:-3e-4}" --set train.warmup_showers=200000 \
      --set energy.train.showers=1000000000 --set energy.train.budget_seconds="${E_S:-45}" --set energy.train.lr=5e-4 \
      --set energy.train.warmup_showers=400000 --set train.compile=true --set train.checkpoint_showers=4000000 \
      ${STAGES:+--stages $STAGES} ${SMOKE_SET:-} ${SETS:-} > $W/logs/$C.log 2>&1
    stamp "$C trained: $(tail -qn1 $W/$C/*/stats.jsonl)"
    (cd $W && cp --parents $C/config.json $C/*/stats.jsonl "$X/"); cp $W/logs/$C.log "$X/"
    [ -z "${NO_BACK:-}" ] && bring_back $W/$C/model.safetensors $C.safetensors
    if [ -n "${ONLY:-}" ]; then   # then evaluate the continued model's rows ONLY of studies/ds2-factorised.toml
      [ -z "${SMOKE:-}" ] && cp $W/$C/model.safetensors src/calofast/models/ds2-factorised.safetensors
      run_study studies/ds2-factorised.toml $(( ${DEADLINE:-570} - ($(date +%s) - t0) )) "$ONLY"
    fi
    ;;
  shortcut)     # into runs/device/$CONT (default sc): several students may train at once under different CONT
    data; C=${CONT:-sc}
    quiet cf distill shortcut --teacher "${SC_INIT:-ds2-factorised}" --data $W/train.h5 -o $W/$C \
      --set train.showers=1000000000 --set distill.sc_showers=1000000000 --set train.budget_seconds="${SC_S:-400}" \
      --set distill.lr="${LR:-2e-4}" --set train.warmup_showers=200000 --set train.compile=true \
      --set train.bundle_dtype=fp16 --set train.checkpoint_showers=4000000 ${SMOKE_SET:-} ${SETS:-} > $W/logs/$C.log 2>&1
    stamp "shortcut $C trained: $(tail -qn1 $W/$C/stats.jsonl)"
    (cd $W && cp --parents $C/config.json $C/stats.jsonl "$X/"); cp $W/logs/$C.log "$X/"
    [ -z "${NO_BACK:-}" ] && bring_back $W/$C/shortcut.safetensors $C.safetensors
    if [ -n "${ONLY:-}" ]; then   # the plan with its model pointed at the new bundle (its own study folder)
      sed "s|\"ds2-shortcut\"|\"$(cd $W/$C && pwd)/shortcut.safetensors\"|" studies/ds2-shortcut.toml > $W/$C-ds2-shortcut.toml
      run_study $W/$C-ds2-shortcut.toml $(( ${DEADLINE:-570} - ($(date +%s) - t0) )) "$ONLY"
    fi
    ;;
  ablation)     # ROWS (names below) trained one after another, ABL_S s each, then evaluated in the same call;
                # ABL_PAR=1: all rows at once, compiled, sharing the GPU for ABL_S s (equal wall time and share),
                # and not evaluated (the next call: RUNS="$ROWS" ... rows)
    data
    B=${ABL_S:-60}; E=${ABL_E:-12}; plan=$W/ablation-$(echo ${ROWS:-abl-final} | tr ' ' '+').toml
    row_args() {   # NAME -> preset, energy s, shape s, overrides: one ingredient changed from abl-final
      local f="ds2-factorised $E $((B - E))"
      case $1 in
        abl-final) echo "$f" ;;
        abl-final-2x) echo "ds2-factorised $((2 * E)) $((2 * (B - E)))" ;;
        abl-old) echo "ds2-unet 0 $B --set train.batch_size=1024 --set train.lr=4e-4 --set train.warmup_showers=200000 --set train.ema_halflife_showers=500000" ;;
        abl-nofact) echo "ds2-factorised 0 $B --set transform.kind=logit --set network.layer_cond=false" ;;
        abl-unet) echo "$f --set network.arch=unet --set network.channels=16,32,64 --set network.layer_cond=false" ;;
        abl-p343) echo "$f --set network.patch=3,4,3" ;;
        abl-vpv) echo "$f --set diffusion.param=v" ;;
        abl-globalstd) echo "$f --set transform.standardise=global" ;;
        abl-deq) echo "$f --set transform.dequantise=true" ;;
        abl-lownoise) echo "$f --set diffusion.p_mean=-0.6 --set diffusion.p_std=1.2" ;;
        t400|t1000|t4000) echo "$f --set diffusion.param=v --set diffusion.timesteps=${1#t}" ;;   # T vs S (study issue)
        *) echo "unknown ablation row $1" >&2; exit 2 ;;
      esac
    }
    for name in ${ROWS:-abl-final}; do row_args $name > /dev/null || exit 2; done
    train_row() {  # train_row NAME COMPILE, unless it is trained already
      [ -f $W/$1/model.safetensors ] || train_run $1 $(row_args $1 | cut -d' ' -f1-3) $2 $(row_args $1 | cut -d' ' -f4-)
    }
    if [ -n "${ABL_PAR:-}" ]; then
      n_rows=$(echo ${ROWS:-abl-final} | wc -w)
      if [ "$n_rows" -gt "${MAX_PAR:-3}" ]; then   # session 9: seven trainers at once ran at 24,000 showers/s together
        echo "ABL_PAR: $n_rows rows at once; more than MAX_PAR=${MAX_PAR:-3} share one GPU badly (raise MAX_PAR to insist)" >&2; exit 2
      fi
      comp=true; [ -n "${SMOKE:-}" ] && comp=false
      for name in ${ROWS:-abl-final}; do train_row $name $comp & done
      wait; stamp "rows trained at once: evaluate them with RUNS=\"${ROWS:-abl-final}\" ... rows"
      # BACK=1: the bundles come back too (15 MB parts: a 19 MB DS2 bundle is two files of the call's eight)
      [ -n "${BACK:-}" ] && for name in ${ROWS:-abl-final}; do bring_back $W/$name/model.safetensors $name.safetensors; done
      tar czf "$OUTABS/results-ablation.tgz" -C "$X" .; exit 0
    fi
    for name in ${ROWS:-abl-final}; do train_row $name false; done
    rows_plan "ablation at equal budget ($B s each)" ${ROWS:-abl-final} > $plan
    stamp "plan $plan"
    run_study $plan $(( ${DEADLINE:-565} - ($(date +%s) - t0) )) "${ONLY:-}"
    ;;
  speed)        # (few-step issue) where a batch's time goes (benchmarks/profile_pipeline.py, PROFILES="ARGS;ARGS"),
                # calofast bench of BENCHES="ARGS;ARGS" (each: --model ... --steps ...), then ONLY=rows of PLAN
    [ -z "${SMOKE:-}" ] && for f in .carry/*.safetensors; do [ -f "$f" ] && cp "$f" src/calofast/models/; done
    dt=bf16; [ -n "${SMOKE:-}" ] && dt=fp32
    IFS=';' read -ra profs <<< "${PROFILES:-}"
    for p in "${profs[@]}"; do
      stamp "profile $p"
      timeout ${STEP_S:-120} python benchmarks/profile_pipeline.py --device $DEV ${SMOKE:+--no-graph --repeats 2} \
        $([ -z "${SMOKE:-}" ] && echo "--bf16 --compile") $p 2>&1 | grep -v Warning | tee -a "$X/profile.txt"
    done
    IFS=';' read -ra benches <<< "${BENCHES:-}"
    for k in "${!benches[@]}"; do
      stamp "bench ${benches[$k]}"
      timeout ${STEP_S:-120} python -m calofast bench ${benches[$k]} --device $DEV --dtype $dt --repeats ${REPEATS:-5} \
        $([ -z "${SMOKE:-}" ] && echo "--compile") -o "$X/bench-$k.csv" 2>&1 | grep -v -E "Warning|it/s|s/it" | tee -a "$X/bench.txt"
    done
    [ -n "${TT:-}" ] && timeout ${STEP_S:-120} python benchmarks/bench_teacher_targets.py 2>&1 | grep -v Warning | tee "$X/teacher_targets.txt"
    [ -n "${ONLY:-}" ] && run_study "${PLAN:-studies/ds2-shortcut.toml}" $(( ${DEADLINE:-560} - ($(date +%s) - t0) )) "$ONLY"
    ;;
  tvs)          # (study issue) T versus S: studies/ds2-T-vs-S.toml on the runs t400, t1000, t4000 (ablation rows):
                # strided DDPM and DDIM at S = 50 and 200, one study, full protocol, three classifier seeds
    plan=$W/ds2-T-vs-S.toml    # the shipped plan, its models runs/tNNN/ pointed at this machine's runs
    sed "s|\"runs/|\"$(cd $W && pwd)/|" studies/ds2-T-vs-S.toml > $plan
    [ -n "${SMOKE:-}" ] && sed -i 's/^compile = true/compile = false/' $plan
    run_study $plan $(( ${DEADLINE:-560} - ($(date +%s) - t0) )) "${ONLY:-}"
    ;;
  rows)
    plan=$W/rows-$(echo ${RUNS:?RUNS names the runs} | tr ' ' '+').toml
    for name in $RUNS; do   # a run trained in an earlier session: its bundle carried as .carry/NAME.safetensors
      [ -f $W/$name/model.safetensors ] || { [ -f .carry/$name.safetensors ] && mkdir -p $W/$name && cp .carry/$name.safetensors $W/$name/model.safetensors; }
    done
    rows_plan "runs $RUNS" $RUNS > $plan
    run_study $plan $(( ${DEADLINE:-560} - ($(date +%s) - t0) ))
    ;;
  probe)
    workers=$(( $(nproc) > 1 ? $(nproc) - 1 : 1 )); model=${MODEL:-ds2-factorised}
    for f in ref:1001 floor:2002; do
      [ -f $W/${f%:*}.h5 ] || quiet cf gflash --geometry ds2 --n $N_REF --seed ${f#*:} --workers $workers --chunk 2000 --no-compress -o $W/${f%:*}.h5
    done
    gen=$W/probe-$(basename $model .safetensors).h5
    [ -f $gen ] || quiet cf generate --model $model --energies-from $W/ref.h5 --seed 1 --batch-size 10000 --device $DEV \
      $([ -z "${SMOKE:-}" ] && echo "--dtype bf16 --compile") --sampler dpmpp-2m --steps $GEN_STEPS -o $gen
    stamp "generated $gen"
    python scripts/classifier_probe.py --generated $gen --reference $W/ref.h5 --floor $W/floor.h5 --device $DEV \
      --n $N_REF $FAST ${PROBE_ONLY:+--only "$PROBE_ONLY"} -o "$X/probe-$(basename $model .safetensors).json" 2>&1 | grep -v Warning
    stamp "probe done"
    ;;
  evaluate)
    # Carried bundles join (or replace) the shipped ones in this disposable copy of the tree (plans name models by name).
    [ -z "${SMOKE:-}" ] && for f in .carry/*.safetensors; do [ -f "$f" ] && cp "$f" src/calofast/models/; done
    run_study "${PLAN:-studies/ds2-factorised.toml}" "${DEADLINE:-520}" "${ONLY:-${SMOKE:+gflash-floor,dpmpp-2m-8}}"
    ;;
  *) echo "usage: $0 data|train|continue|ablation|shortcut|speed|probe|rows|evaluate|ds3|tvs"; exit 2 ;;
esac
tar czf "$OUTABS/results-$PHASE${CONT:+-$CONT}.tgz" -C "$X" .
stamp "done"; ls -la "$OUTABS"
