"""Per-address throttling of what a handshake without a valid credential costs.

A connection that says ``NONE``, or presents a wrong secret, an unknown id or
a malformed one, gets a new client: a row in ``clients`` that is never
deleted, and (for the bad ones) a warning in the log.  Without a limit one
host guessing in a loop adds hundreds of rows and log lines a second.  So,
per remote address (IPv4 address, IPv6 /64), two token buckets:

* **failed identifications** (wrong secret, unknown id, malformed id): few;
* **new clients** (``NONE`` and every failed identification): more generous,
  since every fresh install behind a carrier NAT shares one address.

A client presenting a *valid* credential is never counted and never refused,
so a reconnect storm of thousands of phones behind one NAT address goes
through whatever strangers on that address do.  A refused handshake costs no
client row: the handler answers ``ERROR: too many ... try again in N s`` and
closes.  The warnings about failed identifications are rate-limited too, per
address and in all, with a summary of what was left out.

Pure apart from logging: the clock is injected, there is no I/O, and one lock
makes it safe for the handler threads that share it.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from messaging_server.config.addresses import (
    DEFAULT_EXEMPT,
    FAILED_IDENTIFICATIONS_PER_MINUTE,
    NEW_CLIENTS_PER_MINUTE,
    Network,
    parse_exempt,
)
from messaging_server.errors import NikiError

log = logging.getLogger("messaging_server")

REFILL_PERIOD_S = 60.0
# Addresses remembered at once: a stranger with many addresses must not grow
# the table without bound.  About 450 bytes each (4.5 MB in all); the least
# recently seen is forgotten first (its buckets start full again if it comes back).
MAX_TRACKED_ADDRESSES = 10_000
# One host on IPv6 usually has a whole /64 to pick addresses from.
IPV6_PREFIX = 64
# Warnings about one address's failed or refused identifications, per interval;
# beyond that they are counted and summed up in one line per interval.
LOG_LINES_PER_ADDRESS = 3
# ...and about all addresses together, so many addresses cannot flood it either.
MAX_LOG_LINES_PER_INTERVAL = 60
LOG_INTERVAL_S = 60.0

Clock = Callable[[], float]


class Throttled(NikiError):
    """This address has used up its failed identifications or new clients for now."""

    def __init__(self, what: str, retry_after: float) -> None:
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(f"too many {what} from your address, try again in {self.retry_after} s")


# Remote addresses whose key is remembered: parsing an address and testing it against
# the exempt networks took about a tenth of a handshake's CPU (a yappi profile of
# 3,000 handshakes), and reconnecting clients come from the same addresses again.
ADDRESS_KEY_CACHE = 4096


@functools.lru_cache(maxsize=ADDRESS_KEY_CACHE)
def address_key(address: str, exempt: Tuple[Network, ...] = ()) -> Optional[str]:
    """The throttle's key for a remote address; None when it is exempt.

    IPv4 (also IPv4-mapped IPv6, as a dual-stack socket reports it) by address,
    IPv6 by /64.  Something that is not an IP address is its own key.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in network for network in exempt):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


@dataclass
class TokenBucket:
    """Up to ``capacity`` events at once, refilled at ``capacity`` per REFILL_PERIOD_S."""

    capacity: float
    tokens: float
    updated: float

    def refill(self, now: float) -> None:
        rate = self.capacity / REFILL_PERIOD_S
        self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.updated) * rate)
        self.updated = now

    def wait(self) -> float:
        """Seconds until one token is there (0: now); call refill() first."""
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) * REFILL_PERIOD_S / self.capacity


@dataclass
class _AddressState:
    failures: TokenBucket
    new_clients: TokenBucket
    log_window: float = 0.0
    logged: int = 0


class IdentifyThrottle:
    """The buckets of every recently seen address, and the log budget.

    ``failures_per_minute`` or ``new_clients_per_minute`` 0 turns that limit off.
    """

    def __init__(self, failures_per_minute: int = FAILED_IDENTIFICATIONS_PER_MINUTE,
                 new_clients_per_minute: int = NEW_CLIENTS_PER_MINUTE,
                 exempt: str = DEFAULT_EXEMPT, clock: Clock = time.monotonic,
                 max_addresses: int = MAX_TRACKED_ADDRESSES) -> None:
        self.failures_per_minute = failures_per_minute
        self.new_clients_per_minute = new_clients_per_minute
        self.exempt = parse_exempt(exempt)
        self.clock = clock
        self.max_addresses = max_addresses
        self.throttled = 0  # handshakes refused since start
        self._states: OrderedDict[str, _AddressState] = OrderedDict()
        self._lock = threading.Lock()
        start = clock()
        self._log_window = start  # the budget of all addresses together
        self._logged = 0
        self._summary_at = start
        self._suppressed = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._states)

    def new_client(self, address: str, peer: str) -> None:
        """A ``NONE``: count a new client for ``address``, or raise Throttled."""
        self._charge(address, peer, failed=False, what="")

    def failed(self, address: str, peer: str, what: str) -> None:
        """A failed identification (``what`` it presented, for the log; never a secret):
        count it and the new client it gets, and log it within budget; or raise Throttled."""
        self._charge(address, peer, failed=True, what=what)

    def _charge(self, address: str, peer: str, failed: bool, what: str) -> None:
        key = address_key(address, self.exempt)
        if key is None:
            if failed:
                log.warning("%s presented %s: rejected", peer, what)
            return
        with self._lock:
            now = self.clock()
            state = self._state(key, now)
            refusal = self._refusal(state, failed, now)
            if refusal is None:
                if self.failures_per_minute and failed:
                    state.failures.tokens -= 1
                if self.new_clients_per_minute:
                    state.new_clients.tokens -= 1
            else:
                self.throttled += 1
            loggable = (failed or refusal is not None) and self._may_log(state, now)
            summary = self._summary(now)
        if loggable and refusal is not None:
            log.warning("%s throttled: %s", peer, refusal)
        elif loggable:
            log.warning("%s presented %s: rejected", peer, what)
        if summary:
            log.warning("%s", summary)
        if refusal is not None:
            raise refusal

    def _state(self, key: str, now: float) -> _AddressState:
        state = self._states.get(key)
        if state is None:
            state = _AddressState(
                TokenBucket(self.failures_per_minute, self.failures_per_minute, now),
                TokenBucket(self.new_clients_per_minute, self.new_clients_per_minute, now),
                log_window=now)
            self._states[key] = state
            while len(self._states) > self.max_addresses:
                self._states.popitem(last=False)  # the least recently seen
        else:
            self._states.move_to_end(key)
        return state

    def _refusal(self, state: _AddressState, failed: bool, now: float) -> Optional[Throttled]:
        if failed and self.failures_per_minute:
            state.failures.refill(now)
            if state.failures.wait():
                return Throttled("failed identifications", state.failures.wait())
        if self.new_clients_per_minute:
            state.new_clients.refill(now)
            if state.new_clients.wait():
                return Throttled("new clients", state.new_clients.wait())
        return None

    def _may_log(self, state: _AddressState, now: float) -> bool:
        """Within this address's and everyone's budget for the interval?  Else counted."""
        if now - state.log_window >= LOG_INTERVAL_S:
            state.log_window, state.logged = now, 0
        if now - self._log_window >= LOG_INTERVAL_S:
            self._log_window, self._logged = now, 0
        if state.logged >= LOG_LINES_PER_ADDRESS or self._logged >= MAX_LOG_LINES_PER_INTERVAL:
            self._suppressed += 1
            return False
        state.logged += 1
        self._logged += 1
        return True

    def _summary(self, now: float) -> str:
        """Once per interval at most: how many warnings were left out since the last one."""
        if not self._suppressed or now - self._summary_at < LOG_INTERVAL_S:
            return ""
        text = (f"{self._suppressed} more warnings about failed or throttled identifications "
                f"not logged in the last {now - self._summary_at:.0f} s (at most "
                f"{LOG_LINES_PER_ADDRESS} per address and {MAX_LOG_LINES_PER_INTERVAL} in all "
                f"per {LOG_INTERVAL_S:g} s; {self.throttled} handshakes throttled since start)")
        self._summary_at, self._suppressed = now, 0
        return text
