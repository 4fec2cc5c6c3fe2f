"""One delivery attempt of one alert to one channel: HTTP webhooks and SMTP. No Kafka, no ClickHouse.

Used by the notify stage (with retries around it) and by ``POST /v1/webhooks/{id}/test``.

SSRF: a webhook's host is resolved before EVERY attempt (the answer may have changed since the
URL was accepted: DNS rebinding), every address it resolves to must pass
``logic.address_refusal``, and the request then goes to the checked address itself (URL host
replaced by the IP, ``Host`` header and TLS SNI/certificate check still use the name), so the
address that was checked is the one connected to. Redirects are not followed and proxy
variables are ignored.

``Sender.send`` never raises (except on cancellation): whatever one alert holds (a budget name
with line breaks from before the API refused them, a stored e-mail channel listing several
addresses, a field of the wrong type) ends as a ``refused`` attempt carrying the reason, so one
alert can never stop the delivery of the others. An e-mail goes to exactly the channel's one
address: the envelope recipient is given explicitly, never read back from the headers.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from email.message import EmailMessage
from typing import Literal

import httpx

from spendstream.settings import Settings
from stream_processors.notify.logic import (
    WEBHOOK_FORMATS,
    Alert,
    Channel,
    UnsafeTarget,
    WebhookTarget,
    address_refusal,
    build_request,
    classify_http,
    email_message,
    parse_retry_after,
    parse_webhook_url,
)

log = logging.getLogger(__name__)

Verdict = Literal["delivered", "retry", "final", "refused"]
#: at most this much of a failed answer's body is kept for the delivery record
ERROR_BODY_BYTES = 300


@dataclass(frozen=True)
class AttemptResult:
    verdict: Verdict
    duration_ms: int
    http_status: int | None = None
    error: str = ""
    retry_after_s: float | None = None

    @property
    def delivered(self) -> bool:
        return self.verdict == "delivered"


async def resolve_checked(url: str, allow_private: bool, timeout_s: float) -> tuple[WebhookTarget, str]:
    """(target, the address to connect to). Raises UnsafeTarget (refused: a syntax rule, or one of
    the host's addresses is not allowed) or OSError (the name does not resolve now)."""
    target = parse_webhook_url(url)
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM), timeout_s
        )
    except asyncio.TimeoutError:
        raise OSError(f"resolving {target.host} timed out") from None
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve {target.host}: {exc.strerror or exc}") from None
    except UnicodeError:
        # the IDNA encoding refuses the name (an empty or over-long label): no later attempt can succeed
        raise UnsafeTarget(f"{target.host!r} is not a valid host name") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise OSError(f"{target.host} has no address")
    # every address, not just the first: a host answering with one public and one private
    # address would otherwise reach the private one on a later connection
    for address in addresses:
        reason = address_refusal(address, allow_private)
        if reason:
            raise UnsafeTarget(f"{target.host} resolves to {reason}" if address != target.host else reason)
    return target, addresses[0]


class Sender:
    """Makes single attempts. Owns an HTTP client and a small SMTP thread pool; ``close()`` them."""

    def __init__(self, settings: Settings):
        p = settings.processors
        self.allow_private = p.webhook_allow_private
        self.timeout_s = p.webhook_timeout_s
        self.smtp_host, self.smtp_port, self.smtp_from = p.smtp_host, p.smtp_port, p.smtp_from
        self.smtp_starttls, self.smtp_username, self._smtp_password = p.smtp_starttls, p.smtp_username, p.smtp_password
        self._http = httpx.AsyncClient(
            timeout=self.timeout_s,
            follow_redirects=False,
            trust_env=False,
            # no overall cap: the notify stage bounds concurrency per endpoint, so a slow
            # endpoint can never take every pooled connection from the others
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            headers={"Accept": "*/*"},
        )
        # SMTP is blocking (stdlib); its own threads keep a slow mail server from delaying the
        # default executor, which also runs DNS look-ups for webhooks
        self._smtp_threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="notify-smtp")

    async def close(self) -> None:
        await self._http.aclose()
        self._smtp_threads.shutdown(wait=False, cancel_futures=True)

    async def send(self, channel: Channel, alert: Alert) -> AttemptResult:
        try:
            if channel.format == "email":
                return await self._mail(channel, alert)
            if channel.format not in WEBHOOK_FORMATS:
                return AttemptResult("refused", 0, error=f"unknown channel format {channel.format!r}")
            return await self._post(channel, alert)
        except Exception as exc:  # noqa: BLE001 - see the module docstring: one alert never stops the stage
            log.exception("delivering alert %s to %r failed unexpectedly", alert.alert_id, channel.id)
            return AttemptResult("refused", 0, error=f"not sent: {type(exc).__name__}: {exc}"[:ERROR_BODY_BYTES])

    async def _post(self, channel: Channel, alert: Alert) -> AttemptResult:
        started = time.perf_counter()

        def took() -> int:
            return int((time.perf_counter() - started) * 1000)

        try:
            target, address = await resolve_checked(channel.url, self.allow_private, self.timeout_s)
        except UnsafeTarget as exc:
            return AttemptResult("refused", took(), error=f"refused: {exc}")
        except OSError as exc:
            return AttemptResult("retry", took(), error=str(exc))
        try:
            request = build_request(channel, alert, time.time())
            url = httpx.URL(channel.url)
            headers = {**request.headers, "Host": url.netloc.decode("ascii")}
        except Exception as exc:  # noqa: BLE001 - the same alert and channel would fail the same way again
            return AttemptResult("refused", took(), error=f"cannot build the request: {exc}"[:ERROR_BODY_BYTES])
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        try:
            # a hard bound on the whole exchange: httpx's timeout is per read, which a
            # receiver dripping bytes could stretch
            async with asyncio.timeout(self.timeout_s):
                async with self._http.stream(
                    "POST", url.copy_with(host=address), content=request.body, headers=headers, extensions=extensions
                ) as response:
                    verdict = classify_http(response.status_code)
                    detail = "" if verdict == "delivered" else await _body_excerpt(response)
        except (TimeoutError, httpx.TimeoutException):
            return AttemptResult("retry", took(), error=f"timed out after {self.timeout_s:g} s")
        except httpx.TransportError as exc:
            return AttemptResult("retry", took(), error=f"{type(exc).__name__}: {exc}"[:ERROR_BODY_BYTES])
        status = response.status_code
        if verdict == "delivered":
            return AttemptResult("delivered", took(), status)
        retry_after = parse_retry_after(response.headers.get("Retry-After"), datetime.now(timezone.utc))
        error = f"HTTP {status}" + (f": {detail}" if detail else "")
        if verdict == "final":
            error += " (not retried)"
        return AttemptResult(verdict, took(), status, error, retry_after)

    async def _mail(self, channel: Channel, alert: Alert) -> AttemptResult:
        started = time.perf_counter()
        if not self.smtp_host:
            return AttemptResult("refused", 0, error="no SMTP server configured (processors.smtp_host)")
        try:
            message = email_message(alert, channel.email, self.smtp_from, datetime.now(timezone.utc))
        except Exception as exc:  # noqa: BLE001 - e.g. a header the e-mail policy refuses; the same next time
            error = f"cannot build the e-mail: {exc}"[:ERROR_BODY_BYTES]
            return AttemptResult("refused", int((time.perf_counter() - started) * 1000), error=error)
        loop = asyncio.get_running_loop()
        verdict: Verdict = "delivered"
        error = ""
        try:
            await loop.run_in_executor(self._smtp_threads, self._smtp_send, message, channel.email)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            verdict = "final" if all(code >= 500 for code in codes) else "retry"
            error = f"recipient refused: {exc.recipients}"
        except smtplib.SMTPResponseException as exc:
            verdict = "final" if exc.smtp_code >= 500 else "retry"
            error = f"SMTP {exc.smtp_code}: {exc.smtp_error!r}"
        except smtplib.SMTPNotSupportedError as exc:
            # a settings mismatch (servers offer AUTH only after STARTTLS): retrying cannot help
            verdict = "final"
            error = f"{exc} (processors.smtp_starttls is {'on' if self.smtp_starttls else 'off'})"
        except (smtplib.SMTPException, OSError) as exc:
            verdict = "retry"
            error = f"{type(exc).__name__}: {exc}"
        duration = int((time.perf_counter() - started) * 1000)
        return AttemptResult(verdict, duration, error=error[:ERROR_BODY_BYTES])

    def _smtp_send(self, message: EmailMessage, recipient: str) -> None:
        with smtplib.SMTP(self.smtp_host, self.smtp_port, timeout=self.timeout_s) as smtp:
            if self.smtp_starttls:
                # verified against the system's CAs and the configured host name
                smtp.starttls(context=ssl.create_default_context())
            if self.smtp_username:
                smtp.login(self.smtp_username, self._smtp_password.get_secret_value())
            smtp.send_message(message, to_addrs=[recipient])


async def _body_excerpt(response: httpx.Response) -> str:
    """The start of a failed answer's body (never the whole of it: it could be huge)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        chunks.append(chunk)
        size += len(chunk)
        if size >= ERROR_BODY_BYTES:
            break
    return b"".join(chunks)[:ERROR_BODY_BYTES].decode("utf-8", "replace").strip()
