# syntax=docker/dockerfile:1
# One image for every Renderflow component; the command picks the component:
#   python -m services.metadata            gRPC :50051
#   python -m services.imagefetch          gRPC :50052
#   python -m services.generation          gRPC :50053
#   python -m services.generation.worker   no port: claims jobs from PostgreSQL
#   python -m gateway                      HTTP :8080 (the default command)
# Build: docker build -t renderflow:0.1.0 .   (k8s/ runs it as uid 10001, read-only root)

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src

# The code generator is pinned in pyproject's dev extra: install exactly that pin, and nothing
# else of the dev tools, into a venv the final image does not keep.
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c 'import tomllib; dev = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"]; print(next(d for d in dev if d.startswith("grpcio-tools")))' > /tmp/protoc.txt \
    && python -m venv /opt/protoc \
    && /opt/protoc/bin/pip install -r /tmp/protoc.txt

# The same command as `make proto`, without the mypy stubs nobody reads at run time.
COPY protos protos
RUN /opt/protoc/bin/python -m grpc_tools.protoc -I protos \
        --python_out=protos --grpc_python_out=protos protos/renderflow/v1/*.proto \
    && touch protos/renderflow/__init__.py protos/renderflow/v1/__init__.py

# The services and what they share; tools/ (the local stack's command, trace-report, the embedded
# PostgreSQL) runs on a developer's or an SRE's machine, not here: its entry point goes too.
COPY shared shared
COPY services services
COPY gateway gateway
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv /opt/renderflow \
    && /opt/renderflow/bin/pip install . \
    && rm /opt/renderflow/bin/renderflow

# Fail the build, not the pod: every data file of the packages (migrations, specs) must have been
# installed, and the generated contract must import from the installed copy.
RUN site=$(/opt/renderflow/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
    && missing=$(find shared services gateway -type f ! -name '*.py' ! -path '*/__pycache__/*' \
        | while read -r f; do [ -e "$site/$f" ] || echo "$f"; done) \
    && if [ -n "$missing" ]; then \
        echo "not installed (declare them as package data in pyproject.toml):" $missing; exit 1; fi \
    && cd / && /opt/renderflow/bin/python -c 'import renderflow.v1.metadata_pb2_grpc, renderflow.v1.imagefetch_pb2_grpc, renderflow.v1.generation_pb2_grpc'


FROM ${PYTHON_IMAGE}
# A fixed numeric uid, so Kubernetes can verify runAsNonRoot without reading /etc/passwd.
RUN groupadd --system --gid 10001 renderflow \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin renderflow
COPY --from=build /opt/renderflow /opt/renderflow
# Local state goes under /tmp (an emptyDir in k8s): the root filesystem is read-only there.
ENV PATH=/opt/renderflow/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RENDERFLOW_RUN_DIR=/tmp/renderflow
# An empty working directory: `python -m` puts it first on sys.path, and nothing there may shadow
# the installed packages.
WORKDIR /app
USER 10001:10001
EXPOSE 8080 50051 50052 50053
CMD ["python", "-m", "gateway"]
