# syntax=docker/dockerfile:1.7
# The CPU worker image (onnxruntime on the CPU). Build from the repository root:
#   docker build -f deploy/docker/worker-cpu.Dockerfile -t fovea-worker-cpu:0.1.0 .
# Base images are pinned by exact tag; pin digests too in your registry (see deploy/README.md).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- build: a virtual environment from the pinned list, then Fovea installed into it by `pip install .` ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# What the native fast port (worker/native, CMakeLists.txt) builds with: the distribution's gRPC C++
# and protoc with its gRPC plugin.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ make cmake ninja-build pkg-config libgrpc++-dev \
      libprotobuf-dev protobuf-compiler protobuf-compiler-grpc \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY deploy/docker/requirements/ /tmp/requirements/
# --no-deps: the pinned list is complete, so nothing unpinned (and never torch) gets in.
RUN pip install --only-binary=:all: --no-deps -r /tmp/requirements/cpu.txt \
 && pip check \
 && if python -c "import torch" 2>/dev/null; then echo "torch must not be in a service image" >&2; exit 1; fi \
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

# ---- run: the same base, a non-root user, no build tools ----
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 fovea \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin fovea
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    LD_LIBRARY_PATH=/opt/venv/lib/fovea-native \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app
# codegen.require() runs at every start and would refuse to start if the stubs looked stale; the native
# part must load here, without the build stage's packages.
RUN python -c "from fovea import codegen; assert not codegen.is_stale(), 'generated code is stale'" \
 && python -c "from worker.fast_port import binding; binding()"
USER 10001:10001
EXPOSE 8502 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 CMD ["python", "/app/healthcheck.py", "8502"]
CMD ["python", "-m", "worker"]
