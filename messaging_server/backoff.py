"""How long a client waits before it reconnects: exponential back-off with full jitter.

After the n-th failure in a row the delay is drawn uniformly from
``[0, min(cap, base * 2**n))`` ("full jitter", as in the AWS Architecture Blog's
"Exponential Backoff And Jitter" and redis-py's ``FullJitterBackoff``): when a
server restarts, its many clients spread their reconnects over the whole window
instead of arriving together, and a client never waits longer than ``cap``.
``reset()`` after a connection that worked starts again from ``base``.

The object only computes delays; sleeping is left to the caller, so tests need
no clock.
"""

from __future__ import annotations

import random
from typing import Callable

DEFAULT_BASE = 0.5  # seconds: the first window after a failure
DEFAULT_CAP = 30.0  # seconds: no window grows beyond this
# 2**n for n beyond this exceeds any sensible cap; stop counting so it cannot overflow.
MAX_EXPONENT = 32


class ExponentialBackoff:
    """Delays for consecutive failures; not thread-safe (one per reconnecting loop)."""

    def __init__(self, base: float = DEFAULT_BASE, cap: float = DEFAULT_CAP,
                 uniform: Callable[[float, float], float] = random.uniform) -> None:
        if base <= 0 or cap <= 0:
            raise ValueError(f"back-off base and cap must be positive (got {base}, {cap})")
        self.base = base
        self.cap = cap
        self.failures = 0
        self._uniform = uniform  # injectable for tests

    def window(self) -> float:
        """The upper bound of the next delay."""
        return min(self.cap, self.base * 2 ** min(self.failures, MAX_EXPONENT))

    def next_delay(self) -> float:
        """Record one more failure and return how long to wait before the next attempt."""
        delay = self._uniform(0.0, self.window())
        self.failures += 1
        return delay

    def reset(self) -> None:
        """A connection worked: the next failure waits at most ``base`` again."""
        self.failures = 0
