#!/usr/bin/env bash
# One short session on a bare GPU machine (bench/gpu_env.sh makes it ready): `make
# gpu-check`'s model measurements, then the `full` configurations trained for a few epochs on
# fresh 512x512 phantoms with `ctjoint train --device cuda`, so the logs show the loss moving
# and the samples/s. Every step is bounded
# by a timeout and what it wrote is kept even if a later step fails.
#
#   OUT=out/gpu-run bash bench/gpu_training_run.sh                  # on the GPU machine
#   DEVICE=cpu CONFIG=tiny N=9 SIZE=96 JCS_EPOCHS=1 SC_EPOCHS=1 CHECK_ARGS=--smoke \
#     bash bench/gpu_training_run.sh                                # anywhere: proves it runs
set -u
DEVICE=${DEVICE:-cuda}
N=${N:-18}
SIZE=${SIZE:-512}
CONFIG=${CONFIG:-full}
JCS_EPOCHS=${JCS_EPOCHS:-4}
SC_EPOCHS=${SC_EPOCHS:-20}
CHECK_ARGS=${CHECK_ARGS:---budget-s 120}
# shellcheck source=bench/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"

# Data and the preprocessing caches, on the CPU, while the GPU check runs.
DATA=$WORK/data
(
    ctjoint phantom-set "$DATA" --n "$N" --size "$SIZE" --seed 88 --workers 12 &&
        for m in jcs2d deepsc3d; do
            ctjoint train --model "$m" --config "$CONFIG" --data "$DATA" --epochs 0 \
                --out "$WORK/runs/$m" --device cpu --prepare-workers 6
        done
) >"$OUT/prepare.log" 2>&1 &
prepare=$!

if [ "${CHECK:-1}" = 1 ]; then
    stamp "gpu check ($CHECK_ARGS)"
    # shellcheck disable=SC2086  # CHECK_ARGS is a list of arguments
    timeout 200 "$PYTHON" bench/gpu_models.py $CHECK_ARGS --out "$OUT" 2>&1 | tail -25
fi
stamp "training tests on $DEVICE"
CTJOINT_CI=0 timeout 80 "$PYTHON" -P -m pytest -q -p no:cacheprovider tests/test_train_device.py 2>&1 | tail -4
wait "$prepare"
stamp "prepared: $(tail -4 "$OUT/prepare.log" | tr '\n' ' ')"

train() {  # model epochs seconds
    stamp "train $1 $CONFIG, $2 epochs, on $DEVICE"
    timeout "$3" "$PYTHON" -P -m ctjoint.cli train --model "$1" --config "$CONFIG" --data "$DATA" --epochs "$2" --out "$WORK/runs/$1" \
        --device "$DEVICE" --threads 8 --loader-workers 8 2>&1 | grep -v "━" | tail -30
    cp "$WORK/runs/$1/train_log.json" "$OUT/$1_${CONFIG}_train_log.json" 2>/dev/null
}
train jcs2d "$JCS_EPOCHS" 150
train deepsc3d "$SC_EPOCHS" 120
"$PYTHON" - "$OUT" <<'EOF'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*_train_log.json")):
    log = json.loads(path.read_text())
    print(path.name, log["device"].get("name"), f"{log['parameters']:,} parameters")
    for e in log["epochs"]:
        curve = " ".join(f"{v:.3f}" for v in e["loss_curve"])
        print(f"  epoch {e['epoch']}: loss {e['loss']:.4f} [{curve}] {e['samples']} samples "
              f"{e['samples_per_second']:.1f}/s wait {e['batch_wait_seconds']:.1f} s "
              f"peak {e['peak_memory_gib']} GiB; val Dice {e['val'].get('dice')} "
              f"acc {e['val'].get('accuracy')}")
EOF
stamp "done"
