"""Sliding-window counters for the login limits: failed logins per account, attempts per IP.

Pure (the caller passes the time) and bounded: a key keeps at most ``limit`` timestamps, and at
most ``max_keys`` keys are tracked (the least recently used is forgotten first), so a flood of
distinct e-mail addresses or IPs cannot grow memory without bound (about 30 MB per limiter at
100,000 keys of 5 hits).
"""

from __future__ import annotations

import math
from collections import OrderedDict


class SlidingWindow:
    def __init__(self, limit: int, window_s: float, max_keys: int = 100_000):
        self.limit = limit
        self.window_s = window_s
        self.max_keys = max_keys
        # key -> times of its last hits, oldest first (a short list: smaller than a deque per key)
        self._hits: OrderedDict[str, list[float]] = OrderedDict()

    def _recent(self, key: str, now: float) -> list[float] | None:
        hits = self._hits.get(key)
        if hits and hits[0] <= now - self.window_s:
            hits[:] = [t for t in hits if t > now - self.window_s]
        return hits

    def retry_after(self, key: str, now: float) -> int:
        """Seconds until ``key`` may try again; 0 when it may now."""
        hits = self._recent(key, now)
        if not hits or len(hits) < self.limit:
            return 0
        return max(1, math.ceil(hits[0] + self.window_s - now))

    def hit(self, key: str, now: float) -> None:
        hits = self._recent(key, now)
        if hits is None:
            self._hits[key] = [now]
            if len(self._hits) > self.max_keys:
                self._hits.popitem(last=False)
            return
        self._hits.move_to_end(key)
        hits.append(now)
        if len(hits) > self.limit:
            del hits[0]

    def reset(self, key: str) -> None:
        self._hits.pop(key, None)

    def __len__(self) -> int:
        return len(self._hits)
