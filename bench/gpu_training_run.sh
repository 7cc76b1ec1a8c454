#!/usr/bin/env bash
# One short session on a bare GPU machine (torch, numpy, scipy, typer, rich; pydicom and
# nibabel as wheels in $WHEELS): `make gpu-check`'s model measurements, then the `full`
# configurations trained for a few epochs on fresh 512x512 phantoms with `ctjoint train
# --device cuda`, so the logs show the loss moving and the samples/s. Every step is bounded
# by a timeout and what it wrote is kept even if a later step fails.
#
#   OUT=out/gpu-run bash bench/gpu_training_run.sh                  # on the GPU machine
#   DEVICE=cpu CONFIG=tiny N=9 SIZE=96 JCS_EPOCHS=1 SC_EPOCHS=1 CHECK_ARGS=--smoke \
#     bash bench/gpu_training_run.sh                                # anywhere: proves it runs
set -u
OUT=${OUT:-out/gpu-run}
WHEELS=${WHEELS:-.whl}
DEVICE=${DEVICE:-cuda}
N=${N:-18}
SIZE=${SIZE:-512}
CONFIG=${CONFIG:-full}
JCS_EPOCHS=${JCS_EPOCHS:-4}
SC_EPOCHS=${SC_EPOCHS:-20}
CHECK_ARGS=${CHECK_ARGS:---budget-s 120}
WORK=${WORK:-/tmp/ctjoint-gpu-run}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
stamp() { echo "[$(date +%T)] $*"; }

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "$WHEELS"/*.whl || exit 1
fi
# The package from the checkout through a symlink view (as `make gpu-check` does).
VIEW=$WORK/view
rm -rf "$VIEW" && mkdir -p "$VIEW/ctjoint"
for f in ctjoint/*.py ctjoint/py.typed ctjoint/v1; do ln -s "$PWD/$f" "$VIEW/ctjoint/"; done
for d in gateway client export; do ln -s "$PWD/$d" "$VIEW/ctjoint/$d"; done
export PYTHONPATH=$VIEW:$WORK/site PYTHONUNBUFFERED=1
# -P: the checkout's own ctjoint/ (no gateway/ inside) must not shadow the view.
ctjoint() { "$PYTHON" -P -m ctjoint.cli "$@"; }

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
"$PYTHON" -c 'import os, torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cpus", os.cpu_count())'

# Data and the preprocessing caches, on the CPU, while the GPU check runs.
DATA=$WORK/data
(
    ctjoint phantom-set "$DATA" --n "$N" --size "$SIZE" --seed 88 --workers 12 &&
        for m in jcs2d deepsc3d; do
            ctjoint train --model "$m" --config "$CONFIG" --data "$DATA" --epochs 0 \
                --out "$WORK/runs/$m" --device cpu --threads 4 &
        done && wait
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
        --device "$DEVICE" --threads 8 --loader-threads 8 2>&1 | grep -v "━" | tail -30
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
