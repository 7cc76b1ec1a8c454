#!/usr/bin/env bash
# Retraining the tiny networks on a GPU machine, for a session that has one (bench/gpu_env.sh
# makes it ready): fresh training-family phantoms at several source sizes (the held-out sets
# are 256 x 256, the bundled weights saw 160 x 160 only), merged into one set, then both tiny
# configurations fine-tuned from the bundled weights with `ctjoint train --device cuda`.
# Brings back best.pt and train_log.json of each; evaluate and bundle them on the CPU side
# (docs/models.md, "Bundling"). Nothing of the held-out family is generated here.
#
#   OUT=$OUT bash bench/gpu_tiny_retrain.sh                          # on the GPU machine
#   DEVICE=cpu PER_SIZE=6 SIZES="64 96" JCS_EPOCHS=1 SC_EPOCHS=1 \
#     bash bench/gpu_tiny_retrain.sh                                 # anywhere: proves it runs
set -u
DEVICE=${DEVICE:-cuda}
PER_SIZE=${PER_SIZE:-150}
SIZES=${SIZES:-160 256 320}
JCS_EPOCHS=${JCS_EPOCHS:-12}
SC_EPOCHS=${SC_EPOCHS:-24}
SEED=${SEED:-2600}
# A quarter of the tiny configs' rate: the jcs2d fine-tune at 5e-4 beat the one at 2e-3 on
# every fresh set (docs/models.md).
LR=${LR:-0.0005}
# shellcheck source=bench/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"

DATA=$WORK/retrain
rm -rf "$DATA" && mkdir -p "$DATA"
echo "case,label,split" >"$DATA/labels.csv"
for size in $SIZES; do
    stamp "phantoms at $size x $size"
    ctjoint phantom-set "$WORK/set$size" --n "$PER_SIZE" --size "$size" --seed $((SEED + size)) \
        --workers 14 | tail -2
    # One set of all sizes: each case linked under a name that keeps the sizes apart.
    for case in "$WORK/set$size"/case_*; do ln -s "$case" "$DATA/s${size}_$(basename "$case")"; done
    tail -n +2 "$WORK/set$size/labels.csv" | sed "s/^/s${size}_/" >>"$DATA/labels.csv"
done

train() {  # model epochs seconds
    stamp "train $1 tiny from the bundled weights, $2 epochs, on $DEVICE"
    timeout "$3" "$PYTHON" -P -m ctjoint.cli train --model "$1" --config tiny --data "$DATA" \
        --epochs "$2" --out "$WORK/runs/$1" --device "$DEVICE" --threads 8 --loader-workers 12 \
        --prepare-workers 14 --lr "$LR" --init "$VIEW/ctjoint/export/weights/$1_tiny.pt" 2>&1 |
        grep -v "━" | tail -40
    cp "$WORK/runs/$1/best.pt" "$OUT/$1_tiny_retrained.pt" 2>/dev/null
    cp "$WORK/runs/$1/train_log.json" "$OUT/$1_tiny_retrain_log.json" 2>/dev/null
}
train jcs2d "$JCS_EPOCHS" 240
train deepsc3d "$SC_EPOCHS" 240
stamp "done"
