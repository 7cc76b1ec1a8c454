# syntax=docker/dockerfile:1
# ctjoint GPU image: NVIDIA Triton (NGC) + the ctjoint gateway, one image for both roles.
#
#   docker build -t ctjoint:0.1.0 .
#   docker run --gpus 1 -p 50051:50051 -v ctjoint-engines:/var/cache/ctjoint ctjoint:0.1.0
#
# The tag pins Triton 2.54 / TensorRT 10.8 / CUDA 12.8 on Ubuntu 24.04 (Python 3.12); see
# docs/deployment.md "Versions". Every Python package is pinned in deploy/requirements-image.txt
# (checked against the registry by tests/test_image_requirements.py); TensorRT's bindings there
# must equal the base image's TensorRT, whose libraries they load. No torch in the image.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:25.01-py3

# --- build: the project and its pinned Python stack in a virtual environment.
FROM ${TRITON_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Ubuntu 24.04 marks its Python externally managed; virtualenv (pinned) makes the venv
# without the python3-venv package.
RUN python3 -m pip install --break-system-packages virtualenv==20.29.1 \
    && python3 -m virtualenv /opt/ctjoint/venv
COPY deploy/requirements-image.txt ./
RUN /opt/ctjoint/venv/bin/pip install --only-binary=:all: -r requirements-image.txt
COPY pyproject.toml README.md ./
COPY ctjoint ./ctjoint
COPY gateway ./gateway
COPY client ./client
COPY export ./export
# The project without dependencies (all pinned above). Triton's python-backend stubs get a
# folder holding only ctjoint (for ctjoint.contracts): they keep the base image's numpy, the
# one they were built against, instead of the venv's.
RUN /opt/ctjoint/venv/bin/pip install --no-deps ./ \
    && /opt/ctjoint/venv/bin/pip install --no-deps --target /opt/ctjoint/stub-site ./ \
    && mkdir -p /opt/ctjoint/onnx \
    && for model in jcs2d deepsc3d; do \
         cp "export/weights/${model}_tiny.onnx" "/opt/ctjoint/onnx/${model}.onnx"; \
       done

# --- runtime: the same base (its tritonserver and TensorRT), the venv, ONNX and start-up.
FROM ${TRITON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="ctjoint" \
      org.opencontainers.image.description="Chest-CT COVID-19/CAP/normal classification and lesion segmentation on Triton" \
      org.opencontainers.image.licenses="Apache-2.0"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# A fixed, unprivileged uid so volume ownership is predictable (Kubernetes runAsUser too).
RUN groupadd --system --gid 10001 ctjoint \
    && useradd --system --uid 10001 --gid ctjoint --home-dir /var/lib/ctjoint \
         --create-home --shell /usr/sbin/nologin ctjoint \
    && mkdir -p /var/cache/ctjoint /var/lib/ctjoint/run \
    && chown -R ctjoint:ctjoint /var/cache/ctjoint /var/lib/ctjoint
COPY --from=build /opt/ctjoint /opt/ctjoint
COPY --chmod=0755 deploy/entrypoint.sh /opt/ctjoint/bin/entrypoint.sh
COPY --chmod=0755 deploy/healthcheck.py /opt/ctjoint/bin/healthcheck.py
# The venv's bin first: `ctjoint` on PATH. No PYTHONPATH: the entrypoint gives tritonserver
# (and so its python-backend stubs) /opt/ctjoint/stub-site only.
ENV PATH=/opt/ctjoint/venv/bin:${PATH} \
    CTJOINT_STUB_SITE=/opt/ctjoint/stub-site \
    CTJOINT_ROLE=all \
    CTJOINT_ENGINE_CACHE=/var/cache/ctjoint \
    CTJOINT_ONNX_DIR=/opt/ctjoint/onnx \
    CTJOINT_REPOSITORY=/var/lib/ctjoint/run/repository \
    CTJOINT_TRITON_URL=127.0.0.1:8001 \
    CTJOINT_PRECISION=fp16
USER 10001:10001
WORKDIR /var/lib/ctjoint
VOLUME ["/var/cache/ctjoint"]
# 8000/8001/8002: Triton HTTP, gRPC, metrics; 50051: gateway gRPC; 9090: gateway metrics.
EXPOSE 8000 8001 8002 50051 9090
# The first start builds engines (minutes on a large GPU): a long start period before a
# failing check counts.
HEALTHCHECK --interval=15s --timeout=5s --start-period=900s --retries=3 \
    CMD ["/opt/ctjoint/venv/bin/python", "/opt/ctjoint/bin/healthcheck.py"]
ENTRYPOINT ["/opt/ctjoint/bin/entrypoint.sh"]
CMD ["all"]
