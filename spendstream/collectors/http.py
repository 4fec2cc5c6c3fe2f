"""Fetching a provider's report pages with httpx: pagination, 429 with ``retry-after``, backoff
with full jitter on 429/5xx/transport errors, timeouts, and bounded answers.

Only transient failures are retried (429, 5xx, connection errors, timeouts); any other 4xx (a
revoked admin key, a refused parameter) fails the run at once with the provider's status. Error
texts never hold the admin key: it is masked in anything that could echo it.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

log = logging.getLogger(__name__)


class ProviderHttpError(RuntimeError):
    """A page could not be fetched (after retries for transient failures)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class HttpPolicy:
    timeout_s: float = 30.0
    max_attempts: int = 6
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    max_retry_after_s: float = 300.0
    max_response_bytes: int = 32 * 1024 * 1024
    max_pages: int = 10_000


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """``retry-after`` as seconds: delta-seconds or an HTTP-date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if len(value) <= 16 and value.replace(".", "", 1).isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def backoff_seconds(attempt: int, policy: HttpPolicy, rng: Callable[[], float] = random.random) -> float:
    """Full jitter: uniform in [0, min(max, base * 2**attempt))."""
    return rng() * min(policy.backoff_max_s, policy.backoff_base_s * 2**attempt)


class ReportClient:
    """GETs against one provider base URL with one admin key's headers."""

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        secret: str,
        policy: HttpPolicy = HttpPolicy(),
        *,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ):
        self._secret = secret
        self._policy = policy
        self._sleep = sleep
        self._client = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={**headers, "Accept": "application/json", "User-Agent": "spendstream-collector"},
            timeout=httpx.Timeout(policy.timeout_s),
            transport=transport,
            follow_redirects=False,
        )
        self.retries = 0  # how many attempts were retried (for run records)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ReportClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _mask(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def get_json(self, path: str, params: list[tuple[str, str]]) -> Any:
        policy = self._policy
        for attempt in range(policy.max_attempts):
            last = attempt == policy.max_attempts - 1
            try:
                status, headers, body = self._get(path, params)
            except httpx.TransportError as exc:  # connect/read errors and timeouts
                if last:
                    raise ProviderHttpError(self._mask(f"GET {path}: {type(exc).__name__}: {exc}")) from None
                self._wait(backoff_seconds(attempt, policy), f"{type(exc).__name__}")
                continue
            if status == 200:
                try:
                    return json.loads(body)
                except ValueError:
                    raise ProviderHttpError(f"GET {path}: the answer is not JSON", status) from None
            if status == 429 or status >= 500:
                if last:
                    raise ProviderHttpError(f"GET {path}: HTTP {status} after {policy.max_attempts} attempts", status)
                wait = retry_after_seconds(headers.get("retry-after")) if status == 429 else None
                if wait is None:
                    wait = backoff_seconds(attempt, policy)
                elif wait > policy.max_retry_after_s:
                    raise ProviderHttpError(
                        f"GET {path}: HTTP 429 asks to retry after {wait:.0f} s (more than {policy.max_retry_after_s:.0f})",
                        status,
                    )
                self._wait(wait, f"HTTP {status}")
                continue
            detail = self._mask(body[:300].decode("utf-8", "replace"))
            raise ProviderHttpError(f"GET {path}: HTTP {status}: {detail}", status)
        raise AssertionError("unreachable")

    def _wait(self, seconds: float, why: str) -> None:
        self.retries += 1
        log.info("collector: %s, retrying in %.2f s", why, seconds)
        self._sleep(seconds)

    def _get(self, path: str, params: list[tuple[str, str]]) -> tuple[int, httpx.Headers, bytes]:
        limit = self._policy.max_response_bytes
        with self._client.stream("GET", path, params=params) as response:
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise ProviderHttpError(f"GET {path}: answer of {declared} bytes exceeds {limit}", response.status_code)
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > limit:
                    raise ProviderHttpError(f"GET {path}: answer exceeds {limit} bytes", response.status_code)
                chunks.append(chunk)
            return response.status_code, response.headers, b"".join(chunks)

    def pages(self, path: str, params: list[tuple[str, str]], parse: Callable[[Any], Any]) -> Iterator[Any]:
        """Every page of a report, parsed, following ``next_page`` while ``has_more``."""
        cursor: str | None = None
        for _ in range(self._policy.max_pages):
            page = parse(self.get_json(path, params + ([("page", cursor)] if cursor else [])))
            yield page
            if not page.has_more:
                return
            if page.next_page == cursor:  # a provider repeating its cursor would page forever
                raise ProviderHttpError(f"GET {path}: next_page repeats the page just read")
            cursor = page.next_page
        raise ProviderHttpError(f"GET {path}: more than {self._policy.max_pages} pages")
