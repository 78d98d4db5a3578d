# A local stand-in for python:3.x-slim, from Debian's packages: infra/smoke.sh builds it on the
# Debian base it made with debootstrap (no registry is needed). Its build context holds one
# file, ca-certificates.crt: the bundle this machine's own pip trusts, copied in at build time
# (never committed), so that pip inside later builds reaches the index the same way.
ARG DEBIAN_IMAGE=gpuhost-local/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY ca-certificates.crt /etc/ssl/certs/build-ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/build-ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/build-ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1
