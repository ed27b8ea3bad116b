"""Token buckets: per-address budgets for refused requests, and log lines that cannot flood."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """`capacity` events at once, refilled at `rate` per second (monotonic clock)."""

    capacity: float
    rate: float
    tokens: float = -1.0
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.capacity

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def available(self, now: float | None = None) -> bool:
        self._refill(time.monotonic() if now is None else now)
        return self.tokens >= 1.0

    def take(self, now: float | None = None) -> bool:
        """Spend one token if there is one; False when the bucket is empty."""
        self._refill(time.monotonic() if now is None else now)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.capacity


class AddressLimiter:
    """One `TokenBucket` per client address, with the table bounded.

    Full buckets carry no information, so they are dropped first when the table grows;
    past `max_addresses` the least recently used entry goes too, which an attacker with
    many addresses could use to reset its own budget, never anyone else's.
    """

    def __init__(self, capacity: float, rate: float, max_addresses: int = 4096) -> None:
        self.capacity = capacity
        self.rate = rate
        self.max_addresses = max_addresses
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def limited(self, address: str) -> bool:
        """Whether `address` has spent its budget (checking costs nothing)."""
        bucket = self._buckets.get(address)
        return bucket is not None and not bucket.available()

    def spend(self, address: str) -> bool:
        """Charge one refused request to `address`; False once its budget is spent."""
        bucket = self._buckets.get(address)
        if bucket is None:
            self._make_room()
            bucket = self._buckets[address] = TokenBucket(self.capacity, self.rate)
        else:
            self._buckets.move_to_end(address)
        return bucket.take()

    def _make_room(self) -> None:
        if len(self._buckets) < self.max_addresses:
            return
        now = time.monotonic()
        for address in [a for a, b in self._buckets.items() if b.full(now)]:
            del self._buckets[address]
        while len(self._buckets) >= self.max_addresses:
            self._buckets.popitem(last=False)


class RateLimitedLog:
    """Log lines at most `per_second` on average (bursts of `burst`); the rest are counted.

    The next line that gets through says how many were suppressed, so a flood of refused
    requests costs a few log lines, never one per request.
    """

    def __init__(self, logger: logging.Logger, *, burst: float = 5, per_second: float = 1.0) -> None:
        self.logger = logger
        self._bucket = TokenBucket(burst, per_second)
        self._suppressed = 0

    def log(self, level: int, message: str, *args: object) -> None:
        if not self.logger.isEnabledFor(level):
            return
        if not self._bucket.take():
            self._suppressed += 1
            return
        if self._suppressed:
            message += " (%d similar lines suppressed)"
            args = (*args, self._suppressed)
            self._suppressed = 0
        self.logger.log(level, message, *args)


class RateLimitFilter(logging.Filter):
    """A `logging.Filter` letting through a few records per second per message template.

    Put on uvicorn's loggers so a flood of bad connections ("Invalid HTTP request",
    "Exceeded concurrency limit") yields a handful of lines, not one per connection.
    """

    def __init__(self, *, burst: float = 5, per_second: float = 1.0, max_templates: int = 256) -> None:
        super().__init__()
        self.burst = burst
        self.per_second = per_second
        self.max_templates = max_templates
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._suppressed: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = f"{record.name}:{record.msg}"
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_templates:
                old, _ = self._buckets.popitem(last=False)
                self._suppressed.pop(old, None)
            bucket = self._buckets[key] = TokenBucket(self.burst, self.per_second)
        if not bucket.take():
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} similar lines suppressed)"
        return True
