"""HTTPS: the gateway serves TLS with a certificate and key; clients verify it."""

import os
import ssl
import subprocess
import sys

import httpx
import pytest

from cli.tls import local_tls
from harness.helpers import dashboard_sign_in
from harness.processes import Process, free_port, wait_for


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return local_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def https_gateway(stack_env, tls, tmp_path_factory):
    port = free_port()
    args = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--ssl-certfile", str(tls.certificate), "--ssl-keyfile", str(tls.key)]
    gateway = Process("gateway-tls", args, stack_env, tmp_path_factory.mktemp("logs"))
    trusted = ssl.create_default_context(cafile=str(tls.ca_certificate))
    url = f"https://127.0.0.1:{port}"

    def ready() -> bool:
        assert gateway.alive(), gateway.tail()
        try:
            return httpx.get(f"{url}/readyz", verify=trusted, timeout=2).status_code == 200
        except httpx.ConnectError:
            return False

    try:
        wait_for(ready, 60, "the HTTPS gateway")
        yield url, trusted
    finally:
        gateway.stop()


def test_a_client_that_trusts_the_ca_talks_https_with_verification_on(https_gateway):
    url, trusted = https_gateway
    for host in ("127.0.0.1", "localhost"):  # both names are in the certificate
        response = httpx.get(url.replace("127.0.0.1", host) + "/healthz", verify=trusted)
        assert response.status_code == 200
    assert response.url.scheme == "https"


def test_a_client_that_does_not_trust_it_is_refused(https_gateway):
    url, _ = https_gateway
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{url}/healthz", verify=ssl.create_default_context())
    with pytest.raises(httpx.HTTPError):  # and plain HTTP gets no answer on the TLS port
        httpx.get(url.replace("https", "http") + "/healthz", timeout=5)


def test_a_certificate_without_its_key_is_a_clear_error(tls, stack_env):
    done = subprocess.run(
        [sys.executable, "-m", "cli", "serve", "--ssl-certfile", str(tls.certificate)],
        env=os.environ | stack_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "--ssl-keyfile" in done.stderr


def test_the_local_ca_is_kept_and_its_key_is_private(tls):
    again = local_tls(tls.ca_certificate.parent)
    assert again.ca_certificate.read_bytes() == tls.ca_certificate.read_bytes()
    assert (tls.ca_certificate.parent / "ca-key.pem").stat().st_mode & 0o077 == 0
    assert tls.key.stat().st_mode & 0o077 == 0


def test_the_dashboard_cookie_is_secure_over_https(https_gateway):
    from tests.conftest import ADMIN_TOKEN

    url, trusted = https_gateway
    with httpx.Client(base_url=url, verify=trusted) as client:
        signed_in = dashboard_sign_in(client, ADMIN_TOKEN)
    assert signed_in.status_code == 303
    cookie = next(c for c in signed_in.headers.get_list("set-cookie") if "gpuhost_session=" in c)
    assert all(part in cookie.lower() for part in ("secure", "httponly", "samesite=strict"))
    # over HTTPS, browsers are told to come back only that way
    assert "max-age=" in signed_in.headers["strict-transport-security"]
