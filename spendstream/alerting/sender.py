"""One delivery attempt of one alert to one channel: HTTP webhooks and SMTP. No Kafka, no
ClickHouse (except ``deliver_test_alert``, which records its one attempt), no metrics: the notify
stage counts around ``Sender.send`` and retries it; ``POST /v1/webhooks/{id}/test`` sends once.

SSRF: a webhook's host is resolved before EVERY attempt (the answer may have changed since the
URL was accepted: DNS rebinding), every address it resolves to must pass
``targets.address_refusal``, and the request then goes to the checked address itself (URL host
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
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage

import httpx
from clickhouse_connect.driver.asyncclient import AsyncClient

from spendstream.alerting.channels import CHANNEL_TYPES, Channel, MailChannelType, WebhookChannelType
from spendstream.alerting.payloads import Alert, sample_alert
from spendstream.alerting.retries import Verdict, classify_http, outcome_of_test_delivery, parse_retry_after
from spendstream.alerting.store import Attempt, insert_attempt
from spendstream.alerting.targets import UnsafeTarget, resolve_checked
from spendstream.settings import Settings

log = logging.getLogger(__name__)

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


class Sender:
    """Makes single attempts. Owns an HTTP client and a small SMTP thread pool; ``close()`` them."""

    def __init__(self, settings: Settings):
        notify, smtp = settings.notify, settings.notify.smtp
        self.allow_private = notify.webhook.allow_private
        self.timeout_s = notify.timeout_s
        self.smtp_host, self.smtp_port, self.smtp_from = smtp.host, smtp.port, smtp.from_address
        self.smtp_starttls, self.smtp_username, self._smtp_password = smtp.starttls, smtp.username, smtp.password
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
            kind = CHANNEL_TYPES.get(channel.format)
            if isinstance(kind, MailChannelType):
                return await self._mail(kind, channel, alert)
            if not isinstance(kind, WebhookChannelType):
                return AttemptResult("refused", 0, error=f"unknown channel format {channel.format!r}")
            return await self._post(kind, channel, alert)
        except Exception as exc:  # noqa: BLE001 - see the module docstring: one alert never stops the stage
            log.exception("delivering alert %s to %r failed unexpectedly", alert.alert_id, channel.id)
            return AttemptResult("refused", 0, error=f"not sent: {type(exc).__name__}: {exc}"[:ERROR_BODY_BYTES])

    async def _post(self, kind: WebhookChannelType, channel: Channel, alert: Alert) -> AttemptResult:
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
            request = kind.build_request(channel, alert, time.time())
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
        retry_after = parse_retry_after(response.headers.get("Retry-After"), datetime.now(UTC))
        error = f"HTTP {status}" + (f": {detail}" if detail else "")
        if verdict == "final":
            error += " (not retried)"
        return AttemptResult(verdict, took(), status, error, retry_after)

    async def _mail(self, kind: MailChannelType, channel: Channel, alert: Alert) -> AttemptResult:
        started = time.perf_counter()
        if not self.smtp_host:
            return AttemptResult("refused", 0, error="no SMTP server configured (notify.smtp.host)")
        try:
            message = kind.build_message(channel, alert, self.smtp_from, datetime.now(UTC))
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
            error = f"{exc} (notify.smtp.starttls is {'on' if self.smtp_starttls else 'off'})"
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


async def deliver_test_alert(
    settings: Settings, ch: AsyncClient, tenant: str, channel: Channel
) -> tuple[Alert, AttemptResult]:
    """``POST /v1/webhooks/{id}/test``: one attempt of a sample alert (``"test": true``, alert_id
    ``test_...``), recorded in ``alert_deliveries`` like any attempt (outcome delivered, refused
    or gave_up: a test is never retried)."""
    alert = sample_alert(tenant, datetime.now(UTC))
    sender = Sender(settings)
    try:
        attempted_at = datetime.now(UTC)
        result = await sender.send(channel, alert)
    finally:
        await sender.close()
    await insert_attempt(ch, Attempt(tenant, alert.alert_id, channel.id, channel.format, 1, attempted_at,
                                     outcome_of_test_delivery(result.verdict), result.http_status, result.error,
                                     result.duration_ms))  # fmt: skip
    return alert, result
