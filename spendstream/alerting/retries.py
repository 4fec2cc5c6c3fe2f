"""When a delivery attempt is retried, and what is recorded for it. Pure.

``classify_http``: timeouts (408), 429 and 5xx are retried; other answers are final (a 3xx is not
followed). ``RetryPolicy``: exponential backoff with full jitter, or the receiver's
``Retry-After``, until the retry horizon. A receiver's ``Retry-After`` (seconds or HTTP-date) is
held to ``RETRY_AFTER_MIN_S``..``RETRY_AFTER_MAX_S`` (1 s .. 300 s): "0" or a date in the past
must not make us hammer it, and "31536000" must not park a channel past the retry horizon on its
say-so (after 300 s we ask again, and its next answer can push back again). Anything else is
ignored. ``attempt_outcome``: what ``alert_deliveries.outcome`` records for an attempt.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Literal

#: delivery outcomes as recorded in alert_deliveries.outcome
DELIVERED, FAILED, GAVE_UP, REFUSED = "delivered", "failed", "gave_up", "refused"
#: outcomes after which a channel of an alert is never tried again
FINAL_OUTCOMES = frozenset({DELIVERED, GAVE_UP, REFUSED})

#: what one attempt came to: sent, worth another try, answered for good, or refused before sending
#: (an unsafe target, a message that cannot be built: the same next time)
Verdict = Literal["delivered", "retry", "final", "refused"]

RETRY_AFTER_MIN_S = 1.0
RETRY_AFTER_MAX_S = 300.0


def classify_http(status: int) -> Verdict:
    """2xx delivered; 408 (request timeout), 429 and 5xx retried; anything else is final
    (a 3xx is not followed: the target could redirect to an address we would refuse)."""
    if 200 <= status < 300:
        return "delivered"
    if status in (408, 429) or status >= 500:
        return "retry"
    return "final"


_DELTA_SECONDS = re.compile(r"[0-9]+")
#: an HTTP-date is 29 characters; longer values are not parsed at all (the parser's cost and its
#: error messages grow with the input)
_RETRY_AFTER_MAX_LEN = 64


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), held to
    RETRY_AFTER_MIN_S..RETRY_AFTER_MAX_S; None if absent or not one of the two forms (negative
    and fractional numbers included: RFC 9110 allows neither)."""
    if not value:
        return None
    value = value.strip()
    if len(value) > _RETRY_AFTER_MAX_LEN:
        return None
    # ASCII digits only: str.isdigit() also accepts "²", which float() then refuses
    if _DELTA_SECONDS.fullmatch(value):
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    return min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, seconds))


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: before attempt n+1 wait uniform(0, min(cap, base * 2**(n-1)))
    seconds, or the receiver's Retry-After when it sent one; no retry would start after
    ``horizon_s`` from the first attempt."""

    horizon_s: float
    base_s: float = 0.5
    cap_s: float = 300.0

    def next_delay(
        self, attempt: int, elapsed_s: float, retry_after_s: float | None, rand: Callable[[], float]
    ) -> float | None:
        """Seconds to wait after failed attempt ``attempt`` (1-based), or None: give up."""
        if retry_after_s is not None:
            delay = retry_after_s
        else:
            delay = rand() * min(self.cap_s, self.base_s * 2 ** min(attempt - 1, 62))
        return delay if elapsed_s + delay <= self.horizon_s else None


def attempt_outcome(
    verdict: str,
    attempt: int,
    elapsed_s: float,
    retry_after_s: float | None,
    policy: RetryPolicy,
    rand: Callable[[], float],
) -> tuple[str, float | None]:
    """(outcome to record, seconds until the next attempt or None) after attempt ``attempt``
    with ``verdict`` (delivered | retry | final | refused), ``elapsed_s`` after the first attempt."""
    if verdict == "delivered":
        return DELIVERED, None
    if verdict == "refused":
        return REFUSED, None
    if verdict == "final":
        return GAVE_UP, None
    delay = policy.next_delay(attempt, elapsed_s, retry_after_s, rand)
    return (GAVE_UP, None) if delay is None else (FAILED, delay)


def outcome_of_test_delivery(verdict: str) -> str:
    """The recorded outcome of a test delivery: one attempt, never retried."""
    return {"delivered": DELIVERED, "refused": REFUSED}.get(verdict, GAVE_UP)
