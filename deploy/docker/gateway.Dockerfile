# syntax=docker/dockerfile:1.7
# The gateway image (public gRPC on 8500, served by its native front; metrics on 9090). Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t fovea-gateway:0.1.0 .
# Base images are pinned by exact tag; pin digests too in your registry (see deploy/README.md).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- build: a virtual environment from the pinned list, then Fovea installed into it by `pip install .` ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# What the native fast port (gateway/native, CMakeLists.txt) builds with: the distribution's gRPC C++.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ make cmake ninja-build pkg-config libgrpc++-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY deploy/docker/requirements/ /tmp/requirements/
# --no-deps: the pinned list is complete, so nothing unpinned (and never torch) gets in.
RUN pip install --only-binary=:all: --no-deps -r /tmp/requirements/base.txt \
 && pip check \
 && if python -c "import torch" 2>/dev/null; then echo "torch must not be in a service image" >&2; exit 1; fi \
 && pip install --only-binary=:all: --no-deps --target /opt/build-backend -r /tmp/requirements/build.txt
WORKDIR /src
COPY pyproject.toml CMakeLists.txt README.md ./
COPY protos/ protos/
COPY fovea/ fovea/
COPY gateway/ gateway/
# generates the gateway's binding from gateway/native/api.h at build time (CMakeLists.txt fovea_binding)
COPY scripts/cffi_module.py scripts/cffi_module.py
COPY deploy/docker/healthcheck.py /app/healthcheck.py
# Stubs are build output: generate them first, since the install packs them. The install builds the
# gateway's native part (scikit-build-core runs CMakeLists.txt: the cffi module _fovea_gateway, which holds the
# front) into the installed package; the shared
# libraries it needs go beside the venv, so the run stage needs no build tools or -dev packages. Then
# everything is compiled, because the root filesystem is read-only at run time.
RUN python -m fovea.codegen \
 && PYTHONPATH=/opt/build-backend pip install --no-deps --no-build-isolation \
      --config-settings=cmake.define.FOVEA_NATIVE_PARTS=gateway . \
 && lib="$(python -c 'from gateway.fast_port import binding_file; print(binding_file())')" \
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
 && python -c "from gateway.fast_port import load; ffi, lib = load(); lib.fg_start"
USER 10001:10001
EXPOSE 8500 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 CMD ["python", "/app/healthcheck.py", "8500"]
CMD ["python", "-m", "gateway"]
