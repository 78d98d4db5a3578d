"""Where the gateway may connect on a tenant's behalf (job webhooks, image URLs): a public
address, unless the operator allows more.

A URL is checked when it is given and again at every use, on the addresses its host resolves
to then; the caller connects to the address that was checked (the host name still goes in the
Host header and the TLS server name), so a DNS answer that changes in between cannot turn it
towards an internal service. Redirects are not followed. IPv6 forms that carry an IPv4 address
(mapped, translated, compatible, NAT64, 6to4, Teredo) are judged by that address too.
"""

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import httpx

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TargetRefused(ValueError):
    """A URL that must not be called, and why."""


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

    def host_header(self) -> str:
        return self.host if self.port in (80, 443) else f"{self.host}:{self.port}"

    def extensions(self) -> dict:
        """httpx request extensions: the TLS server name is the host's, not the address's."""
        return {"sni_hostname": self.host} if self.scheme == "https" else {}


def networks(cidrs: list[str]) -> list[Network]:
    return [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]


NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits
LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: never public
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # RFC 2765 (SIIT): ::ffff:0:a.b.c.d


def embedded(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries, by every transition form that has one."""
    found = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None]
    if ip in NAT64 or ip in IPV4_COMPATIBLE or ip in IPV4_TRANSLATED:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [address for address in found if address is not None]


def public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if not ip.is_global or ip.is_multicast:
        return False
    if isinstance(ip, ipaddress.IPv4Address):
        return True
    return ip not in LOCAL_NAT64 and all(public(inner) for inner in embedded(ip))


def allowed(address: str, extra: list[Network]) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])  # a scope id (fe80::1%eth0) is no help
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if any(ip in network for network in extra):
        return True
    return public(ip)


def parse(url: str, what: str = "webhook URL") -> tuple[str, str, int, str]:
    if len(url) > 2000:
        raise TargetRefused(f"{what} is over 2000 characters")
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise TargetRefused(f"{what} must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetRefused(f"{what} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise TargetRefused(f"{what} must be http:// or https://")
    if not parts.hostname:
        raise TargetRefused(f"{what} has no host")
    if parts.username or parts.password:
        raise TargetRefused(f"{what} must not carry credentials")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), path


def resolve(url: str, extra: list[Network], what: str = "webhook URL") -> Target:
    """The URL's target, or TargetRefused naming why. Blocks on DNS: call it off the loop."""
    scheme, host, port, path = parse(url, what)
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise TargetRefused(f"{what}: host {host!r} does not resolve ({exc})") from None
    addresses = list(dict.fromkeys(info[4][0] for info in found))
    refused = [address for address in addresses if not allowed(address, extra)]
    if refused:  # every address must be allowed: the client would pick any of them
        raise TargetRefused(
            f"{what}: host {host!r} resolves to {refused[0]}, an address this server may not "
            "reach (private, loopback, link-local or reserved)"
        )
    return Target(url, addresses[0], host, port, scheme, path)


class FetchFailed(ValueError):
    """A URL that could not be fetched; the text says no more than a public server's answer,
    so that it cannot tell internal services apart."""


async def fetch(
    client: httpx.AsyncClient, url: str, extra: list[Network], max_bytes: int, what: str
) -> bytes:
    """GET `url` from the address just checked, redirects not followed, at most `max_bytes`,
    within the client's timeout for each step and `client.timeout.read` for the whole."""
    target = await anyio.to_thread.run_sync(resolve, url, extra, what)
    deadline = client.timeout.read or 10.0
    try:
        with anyio.fail_after(deadline):
            async with client.stream(
                "GET",
                target.pinned_url(),
                headers={"host": target.host_header()},
                extensions=target.extensions(),
            ) as answer:
                if answer.is_redirect:
                    raise FetchFailed(
                        f"{what} redirects (HTTP {answer.status_code}); redirects are not "
                        "followed: give the final URL"
                    )
                if not answer.is_success:
                    raise FetchFailed(f"{what}: the server answered HTTP {answer.status_code}")
                data = bytearray()
                async for piece in answer.aiter_bytes():
                    data += piece
                    if len(data) > max_bytes:
                        raise FetchFailed(f"{what}: the file is larger than {max_bytes} bytes")
                return bytes(data)
    except (httpx.HTTPError, TimeoutError):
        raise FetchFailed(f"{what}: could not be fetched") from None
