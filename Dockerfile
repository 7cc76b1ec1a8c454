# Placeholder until the deployment issue: the GPU image (NGC tritonserver base, multi-stage,
# non-root, TensorRT engines built at start-up) is specified there. Nothing builds from this yet.
FROM scratch
