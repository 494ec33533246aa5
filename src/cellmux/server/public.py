# -*- test-case-name: tests.test_public_mode -*-
"""Public mode's per-address limits: kernels at once, requests per minute.

No I/O: the clock is given, so the limits are tested with a fake one.
Both tables are bounded (L{MAX_ADDRESSES}); the address seen longest ago
is forgotten first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["MAX_ADDRESSES", "AddressLimits", "LimitExceeded", "idle_kernels"]

#: Addresses remembered at once (each costs about 200 bytes).
MAX_ADDRESSES = 10_000
#: The request window, in seconds.
WINDOW = 60.0


class LimitExceeded(Exception):
    """An address is over a limit; C{retry_after} is in seconds, or None."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AddressLimits:
    """Kernels and requests per client address.

    @param kernels: kernels one address may have at once.
    @param requests: requests one address may make per L{WINDOW} seconds.
    @param clock: C{seconds()}.
    """

    def __init__(self, kernels: int, requests: int, clock: Any) -> None:
        self.kernels = kernels
        self.requests = requests
        self._clock = clock
        # address -> (window start, requests in it), least recent first
        self._windows: OrderedDict[str, tuple[float, int]] = OrderedDict()
        # address -> kernel ids it was given
        self._owned: OrderedDict[str, list[str]] = OrderedDict()
        self._pending = 0

    def request(self, address: str) -> None:
        """Count one request. @raise LimitExceeded: over the rate."""
        now = self._clock.seconds()
        start, count = self._windows.pop(address, (now, 0))
        if now - start >= WINDOW:
            start, count = now, 0
        if count >= self.requests:
            self._windows[address] = (start, count)
            wait = max(1.0, start + WINDOW - now)
            raise LimitExceeded(
                f"too many requests from your address: at most {self.requests} a minute; "
                f"try again in {wait:.0f} s",
                wait,
            )
        self._windows[address] = (start, count + 1)
        _trim(self._windows)

    def reserve_kernel(self, address: str, alive: Callable[[str], bool]) -> str:
        """Hold a place for one more kernel of C{address}; settle it with
        L{settle_kernel} once the kernel exists (or failed).

        @raise LimitExceeded: the address has as many kernels as it may.
        """
        self._pending += 1
        place = f"pending-{self._pending}"
        self._check_kernels(address, lambda k: k.startswith("pending-") or alive(k))
        self._owned.setdefault(address, []).append(place)
        self._owned.move_to_end(address)
        _trim(self._owned)
        return place

    def settle_kernel(self, address: str, place: str, kernel_id: str | None) -> None:
        owned = self._owned.get(address)
        if owned is None or place not in owned:
            return
        owned.remove(place)
        if kernel_id is not None:
            owned.append(kernel_id)

    def _check_kernels(self, address: str, alive: Callable[[str], bool]) -> None:
        owned = [k for k in self._owned.get(address, []) if alive(k)]
        if owned:
            self._owned[address] = owned
        else:
            self._owned.pop(address, None)
        if len(owned) >= self.kernels:
            raise LimitExceeded(
                f"your address already has {len(owned)} kernel(s), the most a visitor may "
                "have at once; close other pages with cells of this server, or wait for "
                "their kernels to end"
            )


def _trim(table: OrderedDict) -> None:
    while len(table) > MAX_ADDRESSES:
        table.popitem(last=False)


def idle_kernels(kernels: Iterable[Any], now: float, timeout: float) -> list[Any]:
    """The visitors' kernels to end: no client attached, idle (or dead) for
    C{timeout} seconds. A visitor who left frees their address's place
    sooner than the server-wide C{idle_timeout} would."""
    return [
        k
        for k in kernels
        if not k.clients and k.state.value in ("idle", "dead") and now - k.last_activity > timeout
    ]
