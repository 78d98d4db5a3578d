"""GPU-seconds: the engine's busy time, split among the requests it served.

The engine calls `charge` once per step with how long the step kept the device busy and how
much of the step's work each request was (tokens for LLaVA; steps x pixels for Stable
Diffusion). Each request is billed its share. Every second of a step goes to some request, so
the sum billed equals the busy time (up to float rounding). Queue wait and model load never
pass through here, so they are never billed.
"""

import threading
from collections.abc import Hashable, Mapping


class Meter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[Hashable, float] = {}
        self.busy_seconds = 0.0
        self.billed_seconds = 0.0  # closed accounts only

    def open(self, account: Hashable) -> None:
        with self._lock:
            if account in self._open:
                raise ValueError(f"account {account!r} is already open")
            self._open[account] = 0.0

    def charge(self, seconds: float, work: Mapping[Hashable, float]) -> None:
        """Split `seconds` of busy time among `work`'s accounts by their share of the work."""
        if seconds < 0:
            raise ValueError("a step cannot take negative time")
        total = sum(work.values())
        if not work or total <= 0:
            raise ValueError("a step's time must be charged to the work it did")
        with self._lock:
            self.busy_seconds += seconds
            for account, amount in work.items():
                if amount < 0:
                    raise ValueError(f"negative work for {account!r}")
                self._open[account] += seconds * amount / total

    def close(self, account: Hashable) -> float:
        """The account's total; it is then closed."""
        with self._lock:
            billed = self._open.pop(account)
            self.billed_seconds += billed
            return billed

    def open_seconds(self) -> float:
        """What open accounts have been charged so far."""
        with self._lock:
            return sum(self._open.values())


class WindowMeter:
    """Metering for an engine that cannot be timed step by step (vLLM): from its outputs.

    The engine counts as busy from the moment it holds a request until it holds none. Busy
    time is cut into windows of at least `window` seconds at output events; each window is
    charged to the work (tokens) reported during it. A window with no work yet (a prefill
    still running) is carried into the next one. Everything busy is charged, so the sum billed
    is the busy time, as with `Meter`. `now` is passed in by the caller (its clock).
    """

    def __init__(self, window: float = 0.02) -> None:
        self.meter = Meter()
        self._window = window
        self._lock = threading.Lock()
        self._active: set[Hashable] = set()
        self._pending: dict[Hashable, float] = {}
        self._since: float | None = None  # start of the uncharged busy time

    def start(self, account: Hashable, now: float) -> None:
        with self._lock:
            self.meter.open(account)
            if not self._active:
                self._since = now
            self._active.add(account)

    def output(self, account: Hashable, work: float, now: float) -> None:
        with self._lock:
            self._pending[account] = self._pending.get(account, 0.0) + work
            if now - self._since >= self._window:
                self._settle(now)

    def finish(self, account: Hashable, now: float) -> float:
        with self._lock:
            if not any(self._pending.values()):
                self._pending[account] = 1.0  # ended before any output: its time is its own
            self._settle(now)
            self._active.discard(account)
            if not self._active:
                self._since = None
            return self.meter.close(account)

    def _settle(self, now: float) -> None:
        work = {a: w for a, w in self._pending.items() if w > 0}
        if not work:
            return
        self.meter.charge(max(0.0, now - self._since), work)
        self._pending.clear()
        self._since = now
