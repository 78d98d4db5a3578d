"""The gateway's HTTP connections, guarded before a request reaches the app.

uvicorn waits for a request head as long as a client cares to take, and lets one address open
as many connections as it likes: a few hundred connections that trickle their headers (or send
nothing) hold the server's sockets for good. Its HTTP protocol (httptools or h11, whichever it
picks) is extended here:

- a connection sends a complete request head within `head_seconds` of opening or of the first
  byte of its next request, or it is closed;
- one client address holds at most `per_client` connections at once; beyond, a new one is
  closed at once. Trusted proxies (GPUHOST_TRUSTED_PROXIES) are exempt: their connections
  carry many clients, whose limits the app applies by X-Forwarded-For.
"""

import asyncio
import ipaddress
from collections import Counter

from prometheus_client import Gauge
from uvicorn.protocols.http.auto import AutoHTTPProtocol


def guarded_protocol(
    head_seconds: float, per_client: int, trusted: list[str], open_now: Gauge | None = None
) -> type:
    """uvicorn's HTTP protocol class with these limits (`http=` of its Config); `open_now`
    counts the connections open."""
    networks = [ipaddress.ip_network(cidr, strict=False) for cidr in trusted]

    def exempt(address: str | None) -> bool:
        if address is None:
            return True  # a Unix socket: no address to count
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return True
        return any(ip in network for network in networks)

    class Guarded(AutoHTTPProtocol):
        open_by_address: Counter[str] = Counter()  # shared by the server's connections

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            if open_now is not None:
                open_now.inc()
            self._head_timer: asyncio.TimerHandle | None = None
            address = self.client[0] if self.client else None
            self._counted = None if exempt(address) else address
            if self._counted is not None:
                self.open_by_address[self._counted] += 1
                if per_client and self.open_by_address[self._counted] > per_client:
                    transport.close()
                    return
            self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            if open_now is not None:
                open_now.dec()
            self._stop_head_timer()
            if self._counted is not None:
                self.open_by_address[self._counted] -= 1
                if not self.open_by_address[self._counted]:
                    del self.open_by_address[self._counted]
                self._counted = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._waiting_for_head():
                self._await_head()  # the first byte of a request on a kept-alive connection
            super().data_received(data)
            if not self._waiting_for_head():
                self._stop_head_timer()

        def _waiting_for_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _await_head(self) -> None:
            if self._head_timer is None and head_seconds > 0:
                self._head_timer = self.loop.call_later(head_seconds, self._head_late)

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if self._waiting_for_head() and not self.transport.is_closing():
                self.transport.close()

    return Guarded
