# The gateway, the billing relay and the migration job: no torch, no model code.
#   docker build -f infra/gateway.Dockerfile -t gpuhost-gateway .
# PYTHON_IMAGE: any Debian-based image with python3 and its venv module (infra/smoke.sh builds
# one from Debian's packages where no registry can be reached).
ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS build
RUN python3 -m venv /opt/gpuhost
ENV PATH=/opt/gpuhost/bin:$PATH
WORKDIR /src
COPY infra/constraints.txt infra/constraints.txt
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
# the versions known to go together (infra/lock.py); no model libraries, no embedded servers
RUN pip install --no-cache-dir --quiet -c infra/constraints.txt . \
    && pip uninstall --yes --quiet pip

FROM ${PYTHON_IMAGE}
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin gpuhost \
    && mkdir -p /data/storage && chown 10001:10001 /data/storage
COPY --from=build /opt/gpuhost /opt/gpuhost
USER 10001
WORKDIR /home/gpuhost
ENV PATH=/opt/gpuhost/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    GPUHOST_LISTEN_HOST=0.0.0.0 GPUHOST_LISTEN_PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["gpuhost"]
CMD ["serve"]
