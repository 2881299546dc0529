# syntax=docker/dockerfile:1.7
# The GPU worker image: onnxruntime-gpu 1.31 on the CUDA 13 runtime with cuDNN 9 (what that
# release links against: libcublasLt.so.13, cuDNN 9.*). Build from the repository root:
#   docker build -f deploy/docker/worker-gpu.Dockerfile -t fovea-worker-gpu:0.1.0 .
# Nodes need an NVIDIA driver that supports CUDA 13 (the 580 branch or newer) and the NVIDIA
# container toolkit (the GPU operator installs both). Without them the worker's C++ batch loop
# cannot append the CUDA provider, and each model fails to load saying why (it does not fall back
# to the CPU); the gpu-prod overlay also sets FOVEA_WORKER_REQUIRE_GPU=true.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---- build: a virtual environment from the pinned list, then Fovea installed into it by `pip install .` ----
FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu 24.04's own Python 3.12 (the run stage installs the same package, so the venv's interpreter
# link stays valid), and what the native fast port (worker/native, CMakeLists.txt) builds with: the
# distribution's gRPC C++ and protoc with its gRPC plugin.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv g++ make cmake ninja-build \
      pkg-config libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc \
 && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY deploy/docker/requirements/ /tmp/requirements/
# --no-deps: the pinned list is complete, so nothing unpinned (and never torch) gets in.
# Exactly one ONNX Runtime package: onnxruntime and onnxruntime-gpu share one import folder.
RUN pip install --only-binary=:all: --no-deps -r /tmp/requirements/gpu.txt \
 && pip check \
 && if python -c "import torch" 2>/dev/null; then echo "torch must not be in a service image" >&2; exit 1; fi \
 && python -c "import onnxruntime as ort; assert 'CUDAExecutionProvider' in ort.get_available_providers()" \
 && pip install --only-binary=:all: --no-deps --target /opt/build-backend -r /tmp/requirements/build.txt
WORKDIR /src
COPY pyproject.toml CMakeLists.txt README.md ./
COPY protos/ protos/
COPY fovea/ fovea/
COPY worker/ worker/
# generates the worker's binding from worker/native/api.h at build time (CMakeLists.txt fovea_binding)
COPY scripts/cffi_module.py scripts/cffi_module.py
COPY deploy/docker/healthcheck.py /app/healthcheck.py
# Stubs are build output: generate them first, since the install packs them. The install builds the
# worker's native part (scikit-build-core runs CMakeLists.txt) into the installed package; the shared
# libraries it needs go beside the venv, so the run stage needs no build tools or -dev packages. Then
# everything is compiled, because the root filesystem is read-only at run time.
RUN python -m fovea.codegen \
 && PYTHONPATH=/opt/build-backend pip install --no-deps --no-build-isolation \
      --config-settings=cmake.define.FOVEA_NATIVE_PARTS=worker . \
 && lib="$(python -c 'from worker.fast_port import binding_file; print(binding_file())')" \
 && mkdir -p /opt/venv/lib/fovea-native \
 && ldd "$lib" | awk '/=> \// {print $3}' \
      | grep -E 'grpc|gpr|absl|protobuf|upb|re2|cares|address_sorting|ssl|crypto|libz' \
      | xargs -r cp -L -t /opt/venv/lib/fovea-native/ \
 && python -m compileall -q /opt/venv/lib /app

# ---- run: the CUDA runtime, Python, a non-root user, no build tools ----
FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 fovea \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin fovea
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    LD_LIBRARY_PATH=/opt/venv/lib/fovea-native \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FOVEA_WORKER_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider
WORKDIR /app
# codegen.require() runs at every start and would refuse to start if the stubs looked stale; the native
# part must load here, without the build stage's packages.
RUN python -c "from fovea import codegen; assert not codegen.is_stale(), 'generated code is stale'" \
 && python -c "from worker.fast_port import binding; binding()"
USER 10001:10001
EXPOSE 8502 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 CMD ["python", "/app/healthcheck.py", "8502"]
CMD ["python", "-m", "worker"]
