# The gateway, the billing relay and the migration job: no torch, no model code.
#   docker build -f infra/gateway.Dockerfile -t gpuhost-gateway .
FROM python:3.12-slim AS build
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
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin gpuhost
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# the storage volume's mount point, writable by the service user (GPUHOST_STORAGE_URL)
RUN mkdir -p /data/storage && chown 10001:10001 /data/storage
USER 10001
WORKDIR /home/gpuhost
ENV PYTHONUNBUFFERED=1 GPUHOST_LISTEN_HOST=0.0.0.0 GPUHOST_LISTEN_PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)" || exit 1
ENTRYPOINT ["gpuhost"]
CMD ["serve"]
