"""Where a webhook may go: a public address, unless the operator allows more.

A webhook URL is checked when the job is made and again at every delivery, on the addresses
its host resolves to then; the delivery connects to the address that was checked (the host
name still goes in the Host header and the TLS server name), so a DNS answer that changes in
between cannot turn it towards an internal service. Redirects are not followed.
"""

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TargetRefused(ValueError):
    """A webhook URL that must not be called, and why."""


@dataclass(frozen=True)
class Target:
    url: str  # as given
    address: str  # the checked IP address to connect to
    host: str
    port: int
    scheme: str
    path: str  # with its query

    def pinned_url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def networks(cidrs: list[str]) -> list[Network]:
    return [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]


def allowed(address: str, extra: list[Network]) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if any(ip in network for network in extra):
        return True
    return ip.is_global and not ip.is_multicast


def parse(url: str) -> tuple[str, str, int, str]:
    if len(url) > 2000:
        raise TargetRefused("webhook URL is over 2000 characters")
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise TargetRefused("webhook URL must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetRefused(f"webhook URL is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise TargetRefused("webhook URL must be http:// or https://")
    if not parts.hostname:
        raise TargetRefused("webhook URL has no host")
    if parts.username or parts.password:
        raise TargetRefused("webhook URL must not carry credentials")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), path


def resolve(url: str, extra: list[Network]) -> Target:
    """The URL's target, or TargetRefused naming why. Blocks on DNS: call it off the loop."""
    scheme, host, port, path = parse(url)
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise TargetRefused(f"webhook host {host!r} does not resolve ({exc})") from None
    addresses = list(dict.fromkeys(info[4][0] for info in found))
    refused = [address for address in addresses if not allowed(address, extra)]
    if refused:  # every address must be allowed: the client would pick any of them
        raise TargetRefused(
            f"webhook host {host!r} resolves to {refused[0]}, an address webhooks may not "
            "reach (private, loopback, link-local or reserved)"
        )
    return Target(url, addresses[0], host, port, scheme, path)
