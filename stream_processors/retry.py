"""Retry-until-success for a stage's output IO: a stage never skips input it could not write."""

from __future__ import annotations

import logging

from collections.abc import Callable

from prometheus_client import Counter
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

log = logging.getLogger(__name__)

RETRIES = Counter(
    "spendstream_stage_io_retries_total", "Writes or reads retried after an error", ["stage", "target"]
)


def retry_forever(
    stage: str, target: str, retryable: Callable[[BaseException], bool], max_wait_s: float = 10.0
) -> AsyncRetrying:
    """``async for attempt in retry_forever(...): with attempt: ...`` with exponential backoff,
    logging and counting every failed attempt. Errors for which ``retryable`` is false propagate."""

    def before_sleep(state: RetryCallState) -> None:
        RETRIES.labels(stage, target).inc()
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s: %s failed (attempt %d: %r); retrying in %.1fs",
            stage, target, state.attempt_number, exc, state.next_action.sleep if state.next_action else 0,
        )  # fmt: skip

    return AsyncRetrying(
        retry=retry_if_exception(retryable),
        wait=wait_exponential_jitter(initial=0.1, max=max_wait_s),
        before_sleep=before_sleep,
        reraise=True,
    )


