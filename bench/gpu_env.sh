# Sourced by the bench/gpu_*.sh scripts: a bare GPU machine made ready to run `ctjoint` from
# the checkout. Installs the wheels in $WHEELS (pydicom, nibabel: what the machine's image
# lacks) under $WORK/site, builds the symlink view of the package (as `make gpu-check` does),
# exports PYTHONPATH, defines `ctjoint` and `stamp`, and prints what the machine is.
OUT=${OUT:-out/gpu-run}
WHEELS=${WHEELS:-.whl}
WORK=${WORK:-/tmp/ctjoint-gpu-run}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
stamp() { echo "[$(date +%T)] $*"; }

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" "$WHEELS"/*.whl || exit 1
fi
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
