# Redis from Debian's packages, for the compose smoke test (infra/smoke.sh), where the official
# image cannot be pulled. Like the official image, it runs without protected mode: the compose
# network is its only way in.
ARG DEBIAN_IMAGE=gpuhost-local/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
