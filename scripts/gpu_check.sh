#!/usr/bin/env bash
# GPU check (issue #18): the CUDA paths that CPU-only CI cannot run, in at most 10 minutes on one GPU, ending with a
# Markdown table of each step's status (ok / FAIL / skipped, with why) and its figure. A failing step does not stop
# the others; the exit status is 1 when any step failed.
#
#   1 train-amp          train.py, one epoch on coco128 from yolov5n.pt, --device $DEVICE --amp auto
#   2 export-engine      export.py --include engine --half (TensorRT fp16; --dynamic, so val.py batches as for .pt)
#   3 val-pt, val-engine val.py on the .pt and on the engine; the engine's mAP50-95 must be within 0.5 point
#   4 detect-half        detect.py --half on the coco128 images
#   5 augment-on-device  training img/s without and with --augment-on-device, alternating (A B A B)
#   6 ddp-2gpu           torchrun --nproc_per_node 2 train.py (NCCL) when two GPUs exist, else skipped
#   7 autobatch          --batch-size -1's choice for the weights at --img, then one AMP training step at that batch:
#                        its peak memory must land within 60-95% of the GPU's (AutoBatch aims at 80%)
#
# Usage (from anywhere):  bash scripts/gpu_check.sh
# Settings (environment variables, defaults in brackets):
#   COCO128   coco128 folder with coco128.yaml          [$DETECTOR_SHARED/datasets/coco128, else ../shared/...]
#   WEIGHTS   YOLOv5 or our .pt                          [$DETECTOR_SHARED/weights/yolov5n.pt]
#   DEVICE    CUDA index, or cpu for a dry run of every command on a CPU machine (TensorRT then skips) [0]
#   IMG [640]  BATCH [16]  WORKERS [8]  PYTHON [python]  BUDGET_S: the whole script's seconds [570]
#   AUG_EPOCHS: timed coco128 epochs per side in step 5 [3]
#   STEP_LIMIT_SCALE: multiplies each step's time limit, for slow dry runs [1] (BUDGET_S still caps the total)
#   ONLY: the steps to run, e.g. ONLY="export-engine val" [all: train-amp export-engine val detect-half
#         augment-on-device ddp-2gpu autobatch]; val validates the engine that export-engine wrote in the same run
# Everything is written under a fresh mktemp folder (printed at the start and the end: logs/<step>.log there);
# nothing beside the data or the weights (label caches go there too, via --cache-dir).

set -u -o pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED=${DETECTOR_SHARED:-$REPO_ROOT/../shared}
COCO128=${COCO128:-$SHARED/datasets/coco128}
WEIGHTS=${WEIGHTS:-$SHARED/weights/yolov5n.pt}
DEVICE=${DEVICE:-0}
IMG=${IMG:-640}
BATCH=${BATCH:-16}
WORKERS=${WORKERS:-8}
PYTHON=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-570}
AUG_EPOCHS=${AUG_EPOCHS:-3}
STEP_LIMIT_SCALE=${STEP_LIMIT_SCALE:-1}
STEPS=(train-amp export-engine val detect-half augment-on-device ddp-2gpu autobatch)
ONLY=${ONLY:-${STEPS[*]}}
VAL_BATCH=32
MAP_TOLERANCE=0.005 # 0.5 mAP50-95 points

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOGS=$SCRATCH/logs
RUNS=$SCRATCH/runs
CACHE=$SCRATCH/label-cache
mkdir -p "$LOGS" "$RUNS" "$CACHE"
DATA=$COCO128/coco128.yaml
STARTED=$SECONDS

NAMES=() STATUSES=() FIGURES=() TIMES=() NOTES=()

record() { # name status figure seconds note
    NAMES+=("$1") STATUSES+=("$2") FIGURES+=("$3") TIMES+=("$4") NOTES+=("$5")
    printf '[gpu_check] %-18s %-8s %s %s\n' "$1" "$2" "$3" "$5"
}

# run_step NAME LIMIT_S COMMAND...: run COMMAND (in the repository) with its output in $LOGS/NAME.log, within
# LIMIT_S seconds and what is left of the budget. Sets STEP_RC (124: timed out; 125: not run, budget spent) and
# STEP_S.
run_step() {
    local name=$1 limit=$(($2 * STEP_LIMIT_SCALE))
    shift 2
    local left=$((BUDGET_S - (SECONDS - STARTED)))
    STEP_S=0
    if ((left < 30)); then
        STEP_RC=125
        return
    fi
    ((limit > left)) && limit=$left
    local begin=$SECONDS
    echo "[gpu_check] $name: $* (limit ${limit}s)"
    (cd "$REPO_ROOT" && timeout --kill-after=15 "$limit" "$@") >"$LOGS/$name.log" 2>&1
    STEP_RC=$?
    STEP_S=$((SECONDS - begin))
}

# why_failed NAME: a one-line reason from a step's exit code and log.
why_failed() {
    case $STEP_RC in
        124 | 137) echo "timed out after ${STEP_S}s" ;;
        125) echo "time budget (BUDGET_S=${BUDGET_S}) spent" ;;
        *) echo "exit $STEP_RC: $(grep -v '^\s*$' "$LOGS/$1.log" | tail -n 1 | cut -c1-150)" ;;
    esac
}

# map_of NAME: mAP50-95 of val.py's 'all' row (class, images, instances, P, R, mAP50, mAP50-95) in NAME's log.
map_of() {
    awk '$1 == "all" && NF >= 7 { value = $7 } END { if (value != "") print value }' "$LOGS/$1.log"
}

# ---------------------------------------------------------------------------------------------------------------
echo "[gpu_check] scratch folder: $SCRATCH"
echo "[gpu_check] repository $REPO_ROOT, data $DATA, weights $WEIGHTS, device $DEVICE, --img $IMG"
"$PYTHON" - <<'EOF' 2>&1 | sed 's/^/[gpu_check] /'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)",
      *(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
try:
    import tensorrt
    print(f"TensorRT {tensorrt.__version__}")
except ImportError:
    print("TensorRT not installed (pip install tensorrt)")
EOF
for path in "$DATA" "$WEIGHTS"; do
    if [[ ! -e $path ]]; then
        echo "[gpu_check] $path not found: set COCO128 / WEIGHTS" >&2
        exit 2
    fi
done
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)

# 1. CUDA AMP training, one epoch --------------------------------------------------------------------------------
step_train_amp() {
    local results amp_failed map
    run_step train-amp 240 "$PYTHON" train.py --data "$DATA" --weights "$WEIGHTS" --img "$IMG" --batch-size "$BATCH" \
        --epochs 1 --device "$DEVICE" --amp auto --workers "$WORKERS" --noplots --cache-dir "$CACHE" \
        --project "$RUNS" --name train --exist-ok
    results=$RUNS/train/results.csv
    amp_failed=$(grep -m 1 'AMP check failed' "$LOGS/train-amp.log" | cut -c1-150)
    if ((STEP_RC == 0)) && [[ -f $results ]]; then
        # results.csv: metrics/mAP_0.5:0.95 is the 8th column
        map=$(tail -n 1 "$results" | cut -d, -f8)
        if [[ -n $amp_failed ]]; then # trained, but in fp32: --amp auto's check refused autocast on this device
            record train-amp FAIL "mAP50-95 $(printf '%.3f' "$map") after 1 epoch" "$STEP_S" "$amp_failed"
        else
            record train-amp ok "mAP50-95 $(printf '%.3f' "$map") after 1 epoch" "$STEP_S" "--amp auto, no AMP warning"
        fi
    else
        record train-amp FAIL "-" "$STEP_S" "$(why_failed train-amp)"
    fi
}

# 2. TensorRT fp16 export -----------------------------------------------------------------------------------------
# --dynamic (batch 1..32, sizes up to --img): val.py then batches and letterboxes the engine's images as the .pt's
# (rectangular batches); a static 640x640 engine would be validated on square images, a different test.
step_export_engine() {
    local reason
    run_step export-engine 300 "$PYTHON" export.py --weights "$WEIGHTS" --include engine --half --dynamic \
        --batch-size "$VAL_BATCH" --device "$DEVICE" --img "$IMG" --data "$DATA" --project "$RUNS/export" \
        --name engine --exist-ok
    ENGINE=$(find "$RUNS/export/engine" -name '*.engine' 2>/dev/null | head -n 1)
    if ((STEP_RC == 0)) && [[ -n $ENGINE ]]; then
        record export-engine ok "$(du -m "$ENGINE" | cut -f1) MB engine" "$STEP_S" "fp16, dynamic batch 1-$VAL_BATCH"
    elif grep -qi 'tensorrt.*skipped' "$LOGS/export-engine.log"; then # no CUDA device or no tensorrt package
        reason=$(grep -i -m 1 'tensorrt.*skipped' "$LOGS/export-engine.log" | sed 's/.*skipped[,:]* *//' | cut -c1-150)
        record export-engine skipped "-" "$STEP_S" "$reason"
    else
        record export-engine FAIL "-" "$STEP_S" "$(why_failed export-engine)"
    fi
}

# 3. val.py on the .pt and on the engine ---------------------------------------------------------------------------
step_val() {
    local delta within status
    run_step val-pt 120 "$PYTHON" val.py --data "$DATA" --weights "$WEIGHTS" --img "$IMG" --batch-size "$VAL_BATCH" \
        --device "$DEVICE" --workers "$WORKERS" --cache-dir "$CACHE" --project "$RUNS/val" --name pt --exist-ok
    PT_MAP=$(map_of val-pt)
    if ((STEP_RC == 0)) && [[ -n $PT_MAP ]]; then
        record val-pt ok "mAP50-95 $PT_MAP" "$STEP_S" "fp32 .pt"
    else
        record val-pt FAIL "-" "$STEP_S" "$(why_failed val-pt)"
    fi
    if [[ -z $ENGINE ]]; then
        record val-engine skipped "-" 0 "no engine (see export-engine)"
    else
        run_step val-engine 120 "$PYTHON" val.py --data "$DATA" --weights "$ENGINE" --img "$IMG" \
            --batch-size "$VAL_BATCH" --device "$DEVICE" --workers "$WORKERS" --cache-dir "$CACHE" \
            --project "$RUNS/val" --name engine --exist-ok
        ENGINE_MAP=$(map_of val-engine)
        if ((STEP_RC != 0)) || [[ -z $ENGINE_MAP ]]; then
            record val-engine FAIL "-" "$STEP_S" "$(why_failed val-engine)"
        elif [[ -z $PT_MAP ]]; then
            record val-engine FAIL "mAP50-95 $ENGINE_MAP" "$STEP_S" "no .pt mAP to compare with"
        else
            delta=$(awk -v a="$ENGINE_MAP" -v b="$PT_MAP" 'BEGIN { printf "%+.4f", a - b }')
            within=$(awk -v d="$delta" -v t="$MAP_TOLERANCE" 'BEGIN { print (d <= t && -d <= t) ? "yes" : "no" }')
            status=$([[ $within == yes ]] && echo ok || echo FAIL)
            record val-engine "$status" "mAP50-95 $ENGINE_MAP (.pt $PT_MAP, delta $delta)" "$STEP_S" \
                "must be within 0.5 point of the .pt"
        fi
    fi
}

# 4. detect.py --half -------------------------------------------------------------------------------------------------
step_detect_half() {
    local labelled speed status
    run_step detect-half 120 "$PYTHON" detect.py --weights "$WEIGHTS" --source "$COCO128/images/train2017" \
        --img "$IMG" --half --device "$DEVICE" --save-txt --nosave --project "$RUNS/detect" --name half --exist-ok
    if ((STEP_RC == 0)); then
        labelled=$(find "$RUNS/detect/half/labels" -name '*.txt' 2>/dev/null | wc -l)
        speed=$(grep -o 'Speed: .*' "$LOGS/detect-half.log" | tail -n 1 | cut -c8-)
        status=$( ((labelled > 0)) && echo ok || echo FAIL)
        record detect-half "$status" "$labelled images with detections" "$STEP_S" "${speed:-no Speed line}"
    else
        record detect-half FAIL "-" "$STEP_S" "$(why_failed detect-half)"
    fi
}

# 5. device-side augmentation speed ------------------------------------------------------------------------------------
# Two trainers on coco128 (RAM cache, so decoding does not hide the augmentation's cost), one warm-up epoch each, then
# AUG_EPOCHS epochs each, alternating; img/s counts whole epochs (data waits included, validation excluded).
step_augment_on_device() {
    run_step augment-on-device 240 "$PYTHON" - "$DATA" "$WEIGHTS" "$IMG" "$BATCH" "$WORKERS" "$DEVICE" "$RUNS/aug" \
        "$CACHE" "$AUG_EPOCHS" <<'EOF'
import statistics
import sys
import time

import torch

from detector.config import TrainConfig
from detector.engine.trainer import Trainer

data, weights, imgsz, batch, workers, device, project, cache_dir, epochs = sys.argv[1:]
trainers = {}
for on_device in (False, True):
    config = TrainConfig(data=data, weights=weights, imgsz=int(imgsz), batch_size=int(batch), workers=int(workers),
                         device=device, amp="auto", epochs=100, cache="ram", cache_dir=cache_dir, noplots=True,
                         noval=True, noautoanchor=True, project=project, name=f"on-device-{on_device}",
                         augment_on_device=on_device)  # fmt: skip
    trainers[on_device] = Trainer(config, callbacks=())
rates = {False: [], True: []}
for round_index in range(int(epochs) + 1):  # round 0 warms up (workers, cuDNN autotuning)
    for on_device, trainer in trainers.items():
        images = trainer.num_batches * trainer.batch_size
        started = time.perf_counter()
        trainer.train_one_epoch()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        rate = images / (time.perf_counter() - started)
        trainer.state.epoch += 1
        print(f"round {round_index} augment_on_device={on_device}: {rate:.1f} img/s", flush=True)
        if round_index:
            rates[on_device].append(rate)
loader, on_device = (statistics.median(rates[key]) for key in (False, True))
print(f"RESULT loader {loader:.1f} img/s (min {min(rates[False]):.1f} max {max(rates[False]):.1f}), on-device "
      f"{on_device:.1f} img/s (min {min(rates[True]):.1f} max {max(rates[True]):.1f}), ratio {on_device / loader:.2f}x")
EOF
    if ((STEP_RC == 0)) && grep -q '^RESULT' "$LOGS/augment-on-device.log"; then
        record augment-on-device ok "$(grep '^RESULT' "$LOGS/augment-on-device.log" | cut -c8-)" "$STEP_S" \
            "train img/s, median of $AUG_EPOCHS epochs per side, batch $BATCH, $WORKERS workers"
    else
        record augment-on-device FAIL "-" "$STEP_S" "$(why_failed augment-on-device)"
    fi
}

# 6. 2-process DDP ----------------------------------------------------------------------------------------------------
# On DEVICE=cpu the same command runs on the CPU (gloo): a dry run of the command, not of NCCL.
step_ddp_2gpu() {
    local ddp_devices ddp_note results map backend
    if [[ $DEVICE == cpu ]]; then
        ddp_devices=cpu ddp_note="on the CPU, a dry run of the command"
    elif ((GPUS >= 2)); then
        ddp_devices=0,1 ddp_note="2 GPUs"
    else
        ddp_devices=""
    fi
    if [[ -z $ddp_devices ]]; then
        record ddp-2gpu skipped "-" 0 "$GPUS GPU(s): 2-process NCCL DDP needs 2"
    else
        run_step ddp-2gpu 240 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 2 train.py \
            --data "$DATA" --weights "$WEIGHTS" --img "$IMG" --batch-size $((2 * BATCH)) --epochs 1 \
            --device "$ddp_devices" --workers "$WORKERS" --noplots --cache-dir "$CACHE" --project "$RUNS" --name ddp \
            --exist-ok
        results=$RUNS/ddp/results.csv
        # Rank 0 logs the backend, and after training that every rank holds the same weights.
        if ((STEP_RC == 0)) && [[ -f $results ]] && grep -q 'DDP: all 2 ranks hold identical' "$LOGS/ddp-2gpu.log"; then
            map=$(tail -n 1 "$results" | cut -d, -f8)
            backend=$(grep -o -m 1 '([a-z]* backend)' "$LOGS/ddp-2gpu.log")
            record ddp-2gpu ok "mAP50-95 $(printf '%.3f' "$map") after 1 epoch" "$STEP_S" "$ddp_note $backend"
        else
            record ddp-2gpu FAIL "-" "$STEP_S" "$(why_failed ddp-2gpu)"
        fi
    fi
}

# 7. AutoBatch ------------------------------------------------------------------------------------------------------
step_autobatch() {
    local status
    if [[ $DEVICE == cpu ]]; then
        record autobatch skipped "-" 0 "AutoBatch sizes batches to CUDA memory"
        return
    fi
    run_step autobatch 120 "$PYTHON" - "$WEIGHTS" "$IMG" "$DEVICE" <<'EOF'
import sys

import torch

from detector.engine.autobatch import DEFAULT_FRACTION, autobatch
from detector.models.loading import load_model

weights, imgsz, device = sys.argv[1], int(sys.argv[2]), torch.device(f"cuda:{sys.argv[3]}")
model = load_model(weights, device).train()
batch = autobatch(model, imgsz, device, amp_dtype=torch.float16)
torch.cuda.empty_cache()
torch.cuda.reset_peak_memory_stats(device)
with torch.autocast("cuda", dtype=torch.float16):
    outputs = model(torch.zeros(batch, 3, imgsz, imgsz, device=device))
sum(output.float().sum() for output in outputs).backward()
used = torch.cuda.max_memory_allocated(device) / torch.cuda.get_device_properties(device).total_memory
print(f"RESULT batch {batch}: one step used {100 * used:.0f}% of the GPU's memory (aim {100 * DEFAULT_FRACTION:.0f}%)")
print("WITHIN" if 0.6 <= used <= 0.95 else "OUTSIDE")
EOF
    if ((STEP_RC == 0)) && grep -q '^RESULT' "$LOGS/autobatch.log"; then
        status=$(grep -q '^WITHIN' "$LOGS/autobatch.log" && echo ok || echo FAIL)
        record autobatch "$status" "$(grep '^RESULT' "$LOGS/autobatch.log" | cut -c8-)" "$STEP_S" \
            "--batch-size -1 at --img $IMG, fp16 autocast; must use 60-95%"
    else
        record autobatch FAIL "-" "$STEP_S" "$(why_failed autobatch)"
    fi
}

# ---------------------------------------------------------------------------------------------------------------
ENGINE=""
for step in "${STEPS[@]}"; do
    if [[ " $ONLY " != *" $step "* ]]; then
        record "$step" skipped "-" 0 "not in ONLY"
        continue
    fi
    case $step in
        train-amp) step_train_amp ;;
        export-engine) step_export_engine ;;
        val) step_val ;;
        detect-half) step_detect_half ;;
        augment-on-device) step_augment_on_device ;;
        ddp-2gpu) step_ddp_2gpu ;;
        autobatch) step_autobatch ;;
    esac
done

# ---------------------------------------------------------------------------------------------------------------
echo
echo "GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), device $DEVICE, --img $IMG, $((SECONDS - STARTED)) s in all"
echo
echo "| step | status | figure | seconds | note |"
echo "|---|---|---|---|---|"
failed=0
for i in "${!NAMES[@]}"; do
    echo "| ${NAMES[i]} | ${STATUSES[i]} | ${FIGURES[i]} | ${TIMES[i]} | ${NOTES[i]} |"
    [[ ${STATUSES[i]} == FAIL ]] && failed=1
done
echo
echo "Logs and outputs: $SCRATCH"
exit $failed
