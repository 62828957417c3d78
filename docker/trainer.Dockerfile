# syntax=docker/dockerfile:1.7
# Trainer image: the train worker (`cpl worker --queues train`, docs/deploy.md) with DeepSpeed and
# FlashAttention-2 on CUDA. FlashAttention-2 is compiled once in a devel stage and only its wheel reaches the
# runtime image, which has no compiler.
#
#   docker build -f docker/trainer.Dockerfile -t cpl-trainer:0.1.0 .
#
# Both stages use the same PyTorch release, so the wheel matches the runtime's torch ABI.

ARG TORCH_TAG=2.9.1-cuda12.8-cudnn9

FROM pytorch/pytorch:${TORCH_TAG}-devel AS flash-attn
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# MAX_JOBS bounds the compiler's memory (each job takes several GB).
ARG MAX_JOBS=8
ARG FLASH_ATTN_VERSION=2.8.3.post2
RUN pip install ninja==1.13.0 packaging==25.0 \
    && MAX_JOBS=${MAX_JOBS} pip wheel --no-build-isolation --no-deps --wheel-dir /wheels \
        "flash-attn==${FLASH_ATTN_VERSION}"

FROM pytorch/pytorch:${TORCH_TAG}-runtime AS trainer
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HOME=/home/cpl
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home --home-dir /home/cpl --shell /usr/sbin/nologin cpl \
    && mkdir -p /models /checkpoints /data \
    && chown 10001:10001 /models /checkpoints /data
# DeepSpeed builds its CUDA ops just in time (no compiler here): prebuild none, use the fused Adam from torch.
ARG DEEPSPEED_VERSION=0.19.8
RUN --mount=type=bind,from=flash-attn,source=/wheels,target=/wheels \
    python -m pip freeze --exclude-editable | grep -E '^(torch|nvidia-)' > /tmp/torch-constraints.txt \
    && DS_BUILD_OPS=0 pip install -c /tmp/torch-constraints.txt /wheels/*.whl "deepspeed==${DEEPSPEED_VERSION}" \
    && rm /tmp/torch-constraints.txt
COPY pyproject.toml README.md /tmp/cpl/
COPY cpl /tmp/cpl/cpl
COPY services /tmp/cpl/services
RUN python -m pip freeze --exclude-editable | grep -E '^(torch|nvidia-)' > /tmp/torch-constraints.txt \
    && pip install -c /tmp/torch-constraints.txt /tmp/cpl \
    && rm -rf /tmp/cpl /tmp/torch-constraints.txt
COPY --chmod=0755 docker/healthcheck.py /opt/cpl/healthcheck.py

USER 10001:10001
WORKDIR /home/cpl
# A Celery worker has no HTTP port; its liveness is the process itself (tini exits with it, and the
# orchestrator restarts the container). docs/deploy.md explains how to ask a worker over the broker.
HEALTHCHECK NONE

ENTRYPOINT ["tini", "--"]
CMD ["cpl", "worker", "--queues", "train"]
