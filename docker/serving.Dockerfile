# syntax=docker/dockerfile:1.7
# Serving image: the policy and value gateways (`cpl serve policy|value`) on vLLM's official OpenAI server
# image. The gateway starts vLLM as a child process on a Unix socket (docs/services.md), so the image only adds the
# project on top of vLLM's own Python, changing none of the packages vLLM was built with.
#
#   docker build -f docker/serving.Dockerfile -t cpl-serving:0.1.0 .
#
# The tag must match the vLLM version the gateways were tested against (pyproject.toml's `cpu` extra pins the
# same release for CI): the hot-swap uses vLLM's dev endpoints, which change between releases.
FROM vllm/vllm-openai:v0.32.0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HOME=/home/cpl \
    HEALTHCHECK_URL=http://127.0.0.1:8001/ready

# tini as PID 1 reaps the processes vLLM's engine leaves behind and forwards SIGTERM to the gateway, which stops
# its vLLM child's whole process group.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home --home-dir /home/cpl --shell /usr/sbin/nologin cpl \
    && mkdir -p /models /checkpoints \
    && chown 10001:10001 /models /checkpoints

# The project, installed into vLLM's interpreter under a constraint file made of what is already installed
# (pinned lines only: pip takes no URL constraints): the build fails rather than replace vLLM's torch,
# transformers or any other package.
COPY pyproject.toml README.md /tmp/cpl/
COPY cpl /tmp/cpl/cpl
COPY services /tmp/cpl/services
RUN python3 -m pip freeze --exclude-editable | grep '==' > /tmp/vllm-constraints.txt \
    && python3 -m pip install -c /tmp/vllm-constraints.txt /tmp/cpl \
    && rm -rf /tmp/cpl /tmp/vllm-constraints.txt

COPY --chmod=0755 docker/healthcheck.py /opt/cpl/healthcheck.py

USER 10001:10001
WORKDIR /home/cpl
EXPOSE 8001 8002

# Model loading takes minutes on a large model: the start period covers it (the Kubernetes manifests use a
# startup probe instead).
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python3", "/opt/cpl/healthcheck.py"]

ENTRYPOINT ["tini", "--"]
CMD ["cpl", "serve", "policy"]
