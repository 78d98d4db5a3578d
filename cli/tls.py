"""TLS for the gateway: a certificate and key to serve with, and, for `gpuhost dev --tls`, a
local certificate authority that signs a certificate for this machine's loopback names.

Clients trust the local CA by its certificate file (`ca.pem`): curl `--cacert`, httpx and
the command line client through `SSL_CERT_FILE`, which `gpuhost dev --tls` writes to
STATE_DIR/env. The CA's key never leaves STATE_DIR/tls (mode 0600).
"""

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("localhost",)
LOOPBACK_ADDRESSES = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class LocalTLS:
    ca_certificate: Path
    certificate: Path
    key: Path


def check_pair(certfile: Path | None, keyfile: Path | None) -> None:
    """Both or neither, and readable: a clear error before the server starts."""
    if (certfile is None) != (keyfile is None):
        raise ValueError(
            "TLS needs both a certificate (--ssl-certfile) and its key (--ssl-keyfile)"
        )
    for path, what in ((certfile, "certificate"), (keyfile, "key")):
        if path is not None and not path.is_file():
            raise ValueError(f"TLS {what} file {path} does not exist")


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gpuhost dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def local_tls(directory: Path, days: int = 365) -> LocalTLS:
    """A local CA (made once, kept) and a fresh server certificate it signs for localhost,
    127.0.0.1 and ::1."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    now = dt.datetime.now(dt.UTC)
    ca_key_path, ca_path = directory / "ca-key.pem", directory / "ca.pem"
    if ca_key_path.exists() and ca_path.exists():
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (
            x509.CertificateBuilder()
            .subject_name(_name("gpuhost dev local CA"))
            .issuer_name(_name("gpuhost dev local CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=10 * 365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write_key(ca_key_path, ca_key)
        ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(n) for n in LOOPBACK_NAMES] + [
        x509.IPAddress(ipaddress.ip_address(a)) for a in LOOPBACK_ADDRESSES
    ]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_path, certificate_path = directory / "server-key.pem", directory / "server.pem"
    _write_key(key_path, key)
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return LocalTLS(ca_path, certificate_path, key_path)
