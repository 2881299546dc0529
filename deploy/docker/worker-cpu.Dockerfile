# syntax=docker/dockerfile:1.7
# The CPU worker image (onnxruntime on the CPU). Build from the repository root:
#   docker build -f deploy/docker/worker-cpu.Dockerfile -t fovea-worker-cpu:0.1.0 .
# Base images are pinned by exact tag; pin digests too in your registry (see deploy/README.md).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- build: a virtual environment from the pinned list, and the generated gRPC code ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY deploy/docker/requirements/ /tmp/requirements/
# --no-deps: the pinned list is complete, so nothing unpinned (and never torch) gets in.
RUN pip install --only-binary=:all: --no-deps -r /tmp/requirements/cpu.txt \
 && pip check \
 && if python -c "import torch" 2>/dev/null; then echo "torch must not be in a service image" >&2; exit 1; fi
WORKDIR /app
COPY protos/ protos/
COPY fovea/ fovea/
COPY worker/ worker/
COPY deploy/docker/healthcheck.py healthcheck.py
# Stubs are build output: generate them here, then compile everything, because the root
# filesystem is read-only at run time.
RUN python -m fovea.codegen \
 && python -m compileall -q /app
# The native fast port (worker/native/front.cc), built against the distribution's gRPC C++; the
# shared libraries it needs travel with it, so the run stage needs no build tools or -dev packages.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ pkg-config libgrpc++-dev libprotobuf-dev \
      protobuf-compiler protobuf-compiler-grpc \
 && rm -rf /var/lib/apt/lists/* \
 && worker/native/build.sh \
 && mkdir -p worker/native/build/lib \
 && ldd worker/native/build/libfovea_front.so | awk '/=> \// {print $3}' \
      | grep -E 'grpc|gpr|absl|protobuf|upb|re2|cares|address_sorting|ssl|crypto|libz' \
      | xargs -r cp -L -t worker/native/build/lib/ \
 && rm -rf worker/native/build/gen worker/native/build/*.o

# ---- run: the same base, a non-root user, no build tools ----
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 fovea \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin fovea
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    LD_LIBRARY_PATH=/app/worker/native/build/lib \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app
# codegen.require() runs at every start and would refuse to start if the stubs looked stale.
RUN python -c "from fovea import codegen; assert not codegen.is_stale(), 'generated code is stale'"
USER 10001:10001
EXPOSE 8502 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 CMD ["python", "/app/healthcheck.py", "8502"]
CMD ["python", "-m", "worker"]
