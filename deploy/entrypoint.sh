#!/usr/bin/env bash
# Container start-up for the ctjoint image. One argument picks the role:
#   triton   engines for this GPU (cached in $CTJOINT_ENGINE_CACHE, built when missing), then
#            tritonserver in the foreground (Kubernetes / compose: one role per container)
#   gateway  the gRPC gateway in front of $CTJOINT_TRITON_URL (one or more HOST:PORT, or a
#            headless Service name)
#   all      both in one container (docker run on one GPU box); the container ends when
#            either process does, so the orchestrator restarts a half-dead box
# Anything after the role goes to that process (tritonserver or `ctjoint gateway serve`).
set -euo pipefail

role="${1:-${CTJOINT_ROLE:-all}}"
[[ $# -gt 0 ]] && shift
export CTJOINT_ROLE="${role}"

prepare_repository() {
  python -m ctjoint.export.engine_cache \
    --cache "${CTJOINT_ENGINE_CACHE}" \
    --onnx-dir "${CTJOINT_ONNX_DIR}" \
    --repository "${CTJOINT_REPOSITORY}" \
    --precision "${CTJOINT_PRECISION}"
}

triton_args=(
  --model-repository="${CTJOINT_REPOSITORY}"
  --model-control-mode=none
  # READY only when every model is: the gateway and Kubernetes never route to a half-loaded
  # server.
  --strict-readiness=true
  --exit-on-error=true
  --disable-auto-complete-config
  --http-port=8000 --grpc-port=8001 --metrics-port=8002
)

gateway_args=(
  --host 0.0.0.0 --port 50051 --metrics-port 9090
  --backend triton --triton-url "${CTJOINT_TRITON_URL}"
  --log-format json
)

case "${role}" in
  triton)
    prepare_repository
    exec tritonserver "${triton_args[@]}" "$@"
    ;;
  gateway)
    exec ctjoint gateway serve "${gateway_args[@]}" "$@"
    ;;
  all)
    prepare_repository
    tritonserver "${triton_args[@]}" &
    triton_pid=$!
    # The gateway waits (with back-off) until Triton is ready: no ordering needed here.
    ctjoint gateway serve "${gateway_args[@]}" "$@" &
    gateway_pid=$!
    # SIGTERM from `docker stop` reaches both: the gateway drains its scans, Triton its
    # requests.
    trap 'kill -TERM "${gateway_pid}" "${triton_pid}" 2>/dev/null || true' TERM INT
    status=0
    wait -n "${triton_pid}" "${gateway_pid}" || status=$?
    kill -TERM "${gateway_pid}" "${triton_pid}" 2>/dev/null || true
    wait || true
    exit "${status}"
    ;;
  *)
    echo "usage: entrypoint.sh {triton|gateway|all} [args...]" >&2
    exit 64
    ;;
esac
