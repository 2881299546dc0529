# syntax=docker/dockerfile:1.7
# The registry image (onnxruntime on the CPU validates uploads). Build from the repository root:
#   docker build -f deploy/docker/registry.Dockerfile -t fovea-registry:0.1.0 .
# Base images are pinned by exact tag; pin digests too in your registry (see deploy/README.md).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- build: a virtual environment from the pinned list, then Fovea installed into it by `pip install .` ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The registry has no native part, but the install runs CMakeLists.txt (which then builds nothing):
# CMake and a generator, no compiler.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake ninja-build \
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
COPY registry/ registry/
COPY deploy/docker/healthcheck.py /app/healthcheck.py
# Stubs are build output: generate them first, since the install packs them; then compile
# everything, because the root filesystem is read-only at run time.
RUN python -m fovea.codegen \
 && PYTHONPATH=/opt/build-backend pip install --no-deps --no-build-isolation \
      --config-settings=cmake.define.FOVEA_NATIVE_PARTS=none . \
 && python -m compileall -q /opt/venv/lib /app

# ---- run: the same base, a non-root user, no build tools ----
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 fovea \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin fovea \
 && mkdir -p /var/lib/fovea/artifacts \
 && chown 10001:10001 /var/lib/fovea/artifacts
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FOVEA_REGISTRY_ARTIFACT_DIR=/var/lib/fovea/artifacts
# A named volume mounted here starts with this directory's owner, so the registry can write.
VOLUME /var/lib/fovea/artifacts
WORKDIR /app
# codegen.require() runs at every start and would refuse to start if the stubs looked stale.
RUN python -c "from fovea import codegen; assert not codegen.is_stale(), 'generated code is stale'"
USER 10001:10001
EXPOSE 8501
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 CMD ["python", "/app/healthcheck.py", "8501"]
CMD ["python", "-m", "registry"]
