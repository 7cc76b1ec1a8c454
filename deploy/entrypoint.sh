#!/usr/bin/env bash
# Container start-up for the ctjoint image. One argument picks the role:
#   triton   engines for this GPU (cached in $CTJOINT_ENGINE_CACHE, built when missing), then
#            tritonserver in the foreground (Kubernetes / compose: one role per container)
#   gateway  the gRPC gateway in front of $CTJOINT_TRITON_URL (one or more HOST:PORT, or a
#            headless Service name)
#   all      both in one container (docker run on one GPU box); the container ends when
#            either process does, so the orchestrator restarts a half-dead box
# Anything after the role goes to that process (tritonserver or `ctjoint gateway serve`).
#
# Gateway security from the environment (README "Security"): CTJOINT_TLS_CERT + CTJOINT_TLS_KEY
# serve TLS, CTJOINT_CLIENT_CA adds mutual TLS, CTJOINT_TOKEN_FILE (or CTJOINT_GATEWAY_TOKENS,
# read by the gateway itself) requires bearer tokens.
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
  --grpc-port=8001
  # Triton has no authentication: `ctjoint triton serve` keeps HTTP and metrics closed unless
  # asked. Here they are asked for, on purpose: HTTP for the kubelet / Docker readiness probes
  # (/v2/health/ready), metrics for Prometheus. Model load/unload stays refused (mode none).
  --allow-http=true --http-port=8000
  --allow-metrics=true --metrics-port=8002
)

gateway_args=(
  --host 0.0.0.0 --port 50051 --metrics-port 9090
  --backend triton --triton-url "${CTJOINT_TRITON_URL}"
  --log-format json
)
if [[ -n "${CTJOINT_TLS_CERT:-}" ]]; then
  gateway_args+=(--tls-cert "${CTJOINT_TLS_CERT}" --tls-key "${CTJOINT_TLS_KEY:?CTJOINT_TLS_KEY must go with CTJOINT_TLS_CERT}")
fi
if [[ -n "${CTJOINT_CLIENT_CA:-}" ]]; then
  gateway_args+=(--client-ca "${CTJOINT_CLIENT_CA}")
fi
if [[ -n "${CTJOINT_TOKEN_FILE:-}" ]]; then
  gateway_args+=(--token-file "${CTJOINT_TOKEN_FILE}")
fi

# Triton's python-backend stubs run the base image's Python: they see ctjoint.contracts from
# this folder and the base image's own numpy, never the gateway venv's packages.
run_triton() {
  PYTHONPATH="${CTJOINT_STUB_SITE}" "$@"
}

case "${role}" in
  triton)
    prepare_repository
    exec env PYTHONPATH="${CTJOINT_STUB_SITE}" tritonserver "${triton_args[@]}" "$@"
    ;;
  gateway)
    exec ctjoint gateway serve "${gateway_args[@]}" "$@"
    ;;
  all)
    prepare_repository
    # One container: only the gateway beside it and the health check talk to Triton's gRPC
    # and HTTP endpoints, so they stay on loopback; metrics remain reachable for scraping.
    run_triton tritonserver "${triton_args[@]}" --grpc-address=127.0.0.1 --http-address=127.0.0.1 &
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
