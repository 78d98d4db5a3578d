# A worker: torch, transformers, diffusers, and on GPUs vLLM (GPUHOST_ENGINE=vllm).
#   docker build -f infra/worker.Dockerfile -t gpuhost-worker .                 # CUDA
#   docker build -f infra/worker.Dockerfile -t gpuhost-worker-cpu \
#     --build-arg VARIANT=cpu --build-arg BASE_IMAGE=python:3.11-slim .          # CPU only
# VARIANT=cuda: a CUDA base, torch from the index (its CUDA build) and vLLM.
# VARIANT=cpu: any Debian-based image with python3 and its venv module; torch without vLLM. A
# CPU build of torch is taken from infra/wheels/ when one lies there (infra/smoke.sh puts the
# machine's own there), else from PIP_EXTRA_INDEX_URL (a build argument: an index serving CPU
# builds), else the index's default build.
# Versions: infra/constraints.txt (infra/lock.py), the same torch in both variants.
# Weights are not in the image: mount them at GPUHOST_MODELS_DIR (/models).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}
ARG VARIANT=cuda
ARG PIP_EXTRA_INDEX_URL=
# gcc and python3-dev: Triton builds its kernel launchers with them when a worker compiles at
# load (the Stable Diffusion UNet, GPUHOST_SD_COMPILE; LLaVA's decode step,
# GPUHOST_LLAVA_COMPILE), on GPUs only.
RUN case "$VARIANT" in \
      cuda) apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv gcc python3-dev \
        && rm -rf /var/lib/apt/lists/* ;; \
      cpu) python3 -m venv --help >/dev/null ;; \
      *) echo "VARIANT must be cuda or cpu, not '$VARIANT'" >&2; exit 1 ;; \
    esac \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin gpuhost \
    && mkdir -p /data/storage /models && chown 10001:10001 /data/storage /models
ENV VIRTUAL_ENV=/opt/gpuhost PATH=/opt/gpuhost/bin:$PATH
RUN python3 -m venv $VIRTUAL_ENV
WORKDIR /src
COPY infra/constraints.txt infra/constraints.txt
COPY infra/wheels /wheels
COPY pyproject.toml README.md ./
COPY api api
COPY cli cli
COPY workers workers
COPY billing billing
COPY config config
COPY migrations migrations
COPY storage storage
COPY tuning tuning
COPY webhooks webhooks
# torch first, the variant's own build, then the project (and vLLM) beside it
RUN pip install --no-cache-dir --quiet -c infra/constraints.txt --find-links /wheels torch \
    && if [ "$VARIANT" = cuda ]; then extra=",vllm"; else extra=""; fi \
    && pip install --no-cache-dir --quiet -c infra/constraints.txt --find-links /wheels \
         ".[models$extra]" \
    && pip uninstall --yes --quiet pip \
    && rm -rf /src /wheels
USER 10001
WORKDIR /home/gpuhost
# Caches go to /tmp: the chart and infra/docker-compose.yml mount the root file system read-only.
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 GPUHOST_MODELS_DIR=/models \
    GPUHOST_METRICS_PORT=9400 HF_HUB_OFFLINE=1 HF_HOME=/tmp/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor TRITON_CACHE_DIR=/tmp/triton
EXPOSE 9400
# The metrics port opens once the model is loaded: healthy means serving.
HEALTHCHECK --interval=15s --timeout=3s --start-period=900s --retries=4 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9400/metrics', timeout=2)"]
ENTRYPOINT ["gpuhost"]
CMD ["worker", "--queue", "llava"]
