# A GPU worker: CUDA, torch, transformers, diffusers and (for GPUHOST_ENGINE=vllm) vLLM.
#   docker build -f infra/worker.Dockerfile -t gpuhost-worker .
# Weights are not in the image: mount them at GPUHOST_MODELS_DIR (/models).
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04
# gcc and python3-dev: Triton builds its kernel launchers with them when the Stable Diffusion
# worker compiles its UNet at load (GPUHOST_SD_COMPILE).
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      gcc python3-dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin gpuhost
ENV VIRTUAL_ENV=/opt/gpuhost PATH=/opt/gpuhost/bin:$PATH
RUN python3 -m venv $VIRTUAL_ENV
WORKDIR /src
COPY pyproject.toml README.md ./
COPY api api
COPY cli cli
COPY workers workers
COPY billing billing
COPY migrations migrations
COPY storage storage
COPY tuning tuning
COPY webhooks webhooks
# vLLM pins the torch it is built for; it comes first and the project follows it.
RUN pip install --no-cache-dir "vllm>=0.10" && pip install --no-cache-dir ".[models]" \
    && rm -rf /src
# the storage volume's mount point, writable by the service user (GPUHOST_STORAGE_URL)
RUN mkdir -p /data/storage && chown 10001:10001 /data/storage
USER 10001
WORKDIR /home/gpuhost
# The compilers' caches go to /tmp: the chart mounts the root file system read-only.
ENV PYTHONUNBUFFERED=1 GPUHOST_DEVICE=cuda GPUHOST_MODELS_DIR=/models \
    GPUHOST_METRICS_PORT=9400 HF_HUB_OFFLINE=1 \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor TRITON_CACHE_DIR=/tmp/triton
EXPOSE 9400
# The metrics port opens once the model is loaded: healthy means serving.
HEALTHCHECK --interval=15s --timeout=3s --start-period=900s --retries=4 \
  CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9400/metrics', timeout=2)" || exit 1
ENTRYPOINT ["gpuhost"]
CMD ["worker", "--queue", "llava"]
