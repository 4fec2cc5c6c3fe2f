"""Notify stage core: what to send for an alert, when to retry, and which targets are safe. Pure.

- ``parse_alert``: a ``spendstream.budget.alerts`` value (see spendstream/contracts.py) -> ``Alert``.
- ``build_request``: the HTTP request (body + headers) of one channel format:
  generic JSON (HMAC-SHA256 signed, ``Idempotency-Key: <alert_id>``), Slack incoming webhook,
  PagerDuty Events API v2 (``dedup_key = alert_id``); ``email_message`` for SMTP.
- ``classify_http`` / ``RetryPolicy``: timeouts, 5xx and 429 are retried with exponential backoff
  and full jitter (or the receiver's ``Retry-After``) until the retry horizon; other answers are
  final. A receiver's ``Retry-After`` (seconds or HTTP-date) is held to
  ``RETRY_AFTER_MIN_S``..``RETRY_AFTER_MAX_S`` (1 s .. 300 s): "0" or a date in the past must not
  make us hammer it, and "31536000" must not park a channel past the retry horizon on its say-so
  (after 300 s we ask again, and its next answer can push back again). Anything else is ignored.
- Header safety: user text (budget names, scope values, e-mail channels) reaches e-mail headers
  and one-line summaries. ``one_line`` turns control characters into spaces where text is shown
  (a name stored before the API refused them still delivers, as one line);
  ``email_refusal`` / ``channel_refusal`` refuse what must be exact: a recipient is one plain
  address or nothing. The query API refuses the same things up front.
- ``parse_webhook_url`` / ``address_refusal``: the SSRF rules. The caller resolves the host and
  checks EVERY address it got, then connects to a checked address (never resolves again).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson

WEBHOOK_FORMATS = ("generic", "slack", "pagerduty")
CHANNEL_FORMATS = (*WEBHOOK_FORMATS, "email")
PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
USER_AGENT = "Spendstream-Notify/1"

SIGNATURE_HEADER = "X-Spendstream-Signature"
TIMESTAMP_HEADER = "X-Spendstream-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: a receiver should refuse signatures older than this (replay protection); see verify_signature
SIGNATURE_TOLERANCE_S = 300

#: delivery outcomes as recorded in alert_deliveries.outcome
DELIVERED, FAILED, GAVE_UP, REFUSED = "delivered", "failed", "gave_up", "refused"
#: outcomes after which a channel of an alert is never tried again
FINAL_OUTCOMES = frozenset({DELIVERED, GAVE_UP, REFUSED})

#: the generic body's fields, in this order; money as decimal strings (no *_nanos, no channels)
GENERIC_FIELDS = (
    "alert_id", "kind", "tenant", "budget_id", "budget_name", "scope", "window", "timezone",
    "window_start", "window_end", "threshold", "spent_usd", "limit_usd", "percent_used",
    "projected_usd", "projected_at", "top", "event_id", "event_time", "created_at",
)  # fmt: skip
_REQUIRED = ("alert_id", "kind", "tenant", "budget_id", "spent_usd", "limit_usd", "channels")
#: alert ids go into headers verbatim (Idempotency-Key, Message-ID); budget_alert_id() makes "al_<hex>"
_ALERT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

#: C0 and C1 controls (CR, LF, NUL, TAB, NEL, ...) and the Unicode line and paragraph separators:
#: every character str.splitlines() breaks on, which is what the e-mail header policy refuses
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

RETRY_AFTER_MIN_S = 1.0
RETRY_AFTER_MAX_S = 300.0


class BadAlert(ValueError):
    """A budget.alerts value that is not an alert of contract v1."""


@dataclass(frozen=True)
class Alert:
    alert_id: str
    tenant: str
    kind: str
    channels: tuple[str, ...]
    #: the decoded record value (contract fields)
    fields: dict[str, Any]


def parse_alert(value: bytes | dict[str, Any]) -> Alert:
    try:
        data = orjson.loads(value) if isinstance(value, (bytes, bytearray, memoryview, str)) else value
    except orjson.JSONDecodeError as exc:
        raise BadAlert(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadAlert("not a JSON object")
    missing = [f for f in _REQUIRED if data.get(f) in (None, "")]
    if missing:
        raise BadAlert(f"missing {', '.join(missing)}")
    channels = data["channels"]
    if not isinstance(channels, list) or not all(isinstance(c, str) and c for c in channels):
        raise BadAlert("channels must be a list of non-empty strings")
    if data["kind"] not in ("threshold", "forecast"):
        raise BadAlert(f"unknown kind {data['kind']!r}")
    if not isinstance(data["alert_id"], str) or not _ALERT_ID.fullmatch(data["alert_id"]):
        raise BadAlert("alert_id must be 1..128 of A-Z a-z 0-9 . _ : -")
    # a budget may list a channel twice; it is still one destination
    return Alert(str(data["alert_id"]), str(data["tenant"]), data["kind"], tuple(dict.fromkeys(channels)), data)


@dataclass(frozen=True)
class Channel:
    """Where one copy of an alert goes. ``id`` is what the budget lists: a webhook id or an address."""

    id: str
    format: str  # CHANNEL_FORMATS
    url: str = ""
    email: str = ""
    secret: str = ""


# --------------------------------------------------------------------------------- payloads


def has_control(text: str) -> bool:
    return _CONTROL.search(text) is not None


def one_line(text: str) -> str:
    """``text`` with every control character and line break replaced by a space."""
    return _CONTROL.sub(" ", text)


def generic_body(alert: Alert) -> dict[str, Any]:
    f = alert.fields
    body = {name: f.get(name) for name in GENERIC_FIELDS}
    if f.get("test"):
        body["test"] = True
    return body


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``f"{timestamp}.{body}"`` with the webhook's secret."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, header: str, body: bytes, now: float, tolerance_s: float = SIGNATURE_TOLERANCE_S) -> bool:
    """What a receiver runs: ``header`` is the X-Spendstream-Signature value ``t=<unix s>,v1=<hex>``."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), parts.get("v1", ""))


def human_usd(amount: str | Decimal | None) -> str:
    """'8.010000000' -> '8.01', '0.000123400' -> '0.0001234': exact, at least two decimals."""
    if amount is None:
        return "?"
    try:
        d = Decimal(str(amount))
    except InvalidOperation:
        return str(amount)
    text = f"{d:f}"
    if "." in text:
        text = text.rstrip("0")
        whole, frac = text.split(".")
        text = f"{whole}.{frac.ljust(2, '0')}"
    else:
        text += ".00"
    return text


def _scope_text(scope: Any) -> str:
    if not scope:
        return "whole tenant"
    return ", ".join(f"{k}={v}" for k, v in sorted(scope.items()))


def summary(alert: Alert) -> str:
    """One line for humans (Slack text, PagerDuty summary, e-mail subject), whatever the budget's
    name holds: an e-mail subject with a line break would end the headers early or be refused."""
    return one_line(_summary(alert))


def _summary(alert: Alert) -> str:
    f = alert.fields
    name = f.get("budget_name") or f.get("budget_id")
    window = f.get("window") or "budget"
    limit = human_usd(f.get("limit_usd"))
    if alert.kind == "forecast":
        return (
            f"Budget '{name}' is projected to reach {human_usd(f.get('projected_usd'))} USD in its {window} "
            f"window, over its {limit} USD limit"
        )
    return (
        f"Budget '{name}' crossed {human_usd(f.get('threshold')).removesuffix('.00')}% of its {window} limit: "
        f"{human_usd(f.get('spent_usd'))} of {limit} USD ({f.get('percent_used')}%)"
    )


def _detail_lines(alert: Alert) -> list[str]:
    f = alert.fields
    lines = [
        f"Scope: {_scope_text(f.get('scope'))}",
        f"Window: {f.get('window_start')} .. {f.get('window_end') or 'open'} ({f.get('timezone') or 'UTC'})",
        f"Spent: {human_usd(f.get('spent_usd'))} USD of {human_usd(f.get('limit_usd'))} USD ({f.get('percent_used')}%)",
    ]
    if alert.kind == "forecast":
        lines.append(f"Projected: {human_usd(f.get('projected_usd'))} USD; limit reached around {f.get('projected_at')}")
    top = f.get("top") or []
    if top:
        lines.append(
            "Top spenders: " + ", ".join(f"{t.get('kind')} {t.get('name')} {human_usd(t.get('spent_usd'))} USD" for t in top)
        )
    lines.append(f"Event: {f.get('event_id')}  Alert: {alert.alert_id}")
    # a scope value or agent name with line breaks could otherwise forge lines such as "Spent: ..."
    return [one_line(line) for line in lines]


def slack_body(alert: Alert) -> dict[str, Any]:
    text = summary(alert)
    details = "\n".join(_detail_lines(alert))
    return {
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*{_slack_escape(text)}*"}},
            {"type": "section", "text": {"type": "mrkdwn", "text": _slack_escape(details)}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": f"Spendstream alert `{alert.alert_id}`"}]},
        ],
    }


def _slack_escape(text: str) -> str:
    # Slack treats <...> as links/mentions; budget names are user input
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def pagerduty_severity(alert: Alert) -> str:
    """forecast -> warning; threshold >= 100 % -> critical, >= 80 % -> error, >= 50 % -> warning, else info."""
    if alert.kind == "forecast":
        return "warning"
    try:
        threshold = Decimal(str(alert.fields.get("threshold")))
    except InvalidOperation:
        return "error"
    if threshold >= 100:
        return "critical"
    if threshold >= 80:
        return "error"
    if threshold >= 50:
        return "warning"
    return "info"


def pagerduty_body(alert: Alert, routing_key: str) -> dict[str, Any]:
    f = alert.fields
    return {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": alert.alert_id,
        "payload": {
            "summary": summary(alert)[:1024],  # PagerDuty's limit
            "source": "spendstream",
            "severity": pagerduty_severity(alert),
            "timestamp": f.get("created_at"),
            "component": f.get("budget_name") or f.get("budget_id"),
            "group": alert.tenant,
            "class": f"budget_{alert.kind}",
            "custom_details": generic_body(alert),
        },
    }


@dataclass(frozen=True)
class HttpRequest:
    url: str
    headers: dict[str, str]
    body: bytes


def build_request(channel: Channel, alert: Alert, now: float) -> HttpRequest:
    """The POST for a webhook channel at unix time ``now`` (the signature's timestamp)."""
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, IDEMPOTENCY_HEADER: alert.alert_id}
    if channel.format == "generic":
        body = orjson.dumps(generic_body(alert))
        timestamp = int(now)
        headers[TIMESTAMP_HEADER] = str(timestamp)
        if channel.secret:
            headers[SIGNATURE_HEADER] = f"t={timestamp},v1={sign(channel.secret, timestamp, body)}"
    elif channel.format == "slack":
        body = orjson.dumps(slack_body(alert))
    elif channel.format == "pagerduty":
        body = orjson.dumps(pagerduty_body(alert, channel.secret))
    else:
        raise ValueError(f"{channel.format!r} is not a webhook format")
    # refused here with a reason; the HTTP library would fail it as a transport error, and retry it
    unsafe = [name for name, value in headers.items() if has_control(value)]
    if unsafe:
        raise ValueError(f"control character in header {', '.join(unsafe)}")
    return HttpRequest(channel.url, headers, body)


def email_message(alert: Alert, to: str, sender: str, now: datetime) -> EmailMessage:
    """Raises ValueError when ``to`` is not one plain address (a stored channel from before the
    API refused lists and line breaks must not become extra recipients or headers)."""
    refusal = email_refusal(to)
    if refusal:
        raise ValueError(f"recipient refused: {refusal}")
    msg = EmailMessage()
    msg["Subject"] = f"[Spendstream] {summary(alert)}"
    msg["From"] = sender
    msg["To"] = to
    msg["Date"] = format_datetime(now)
    # stable per (alert, recipient): mail systems that dedupe by Message-ID drop a re-send
    msg["Message-ID"] = f"<{alert.alert_id}.{hashlib.sha256(to.encode()).hexdigest()[:16]}@spendstream>"
    msg["X-Spendstream-Alert-Id"] = alert.alert_id
    msg.set_content(summary(alert) + "\n\n" + "\n".join(_detail_lines(alert)) + "\n")
    return msg


def created_at(alert: Alert) -> datetime | None:
    """When the budgets stage emitted the alert (its ``created_at``), if the value carries one."""
    try:
        emitted = datetime.fromisoformat(alert.fields["created_at"])
    except (KeyError, TypeError, ValueError):
        return None
    # callers subtract it from an aware "now": a naive stamp would raise there
    return emitted if emitted.tzinfo else emitted.replace(tzinfo=timezone.utc)


def sample_alert(tenant: str, now: datetime) -> Alert:
    """A sample threshold alert marked ``"test": true``, for POST /v1/webhooks/{id}/test."""
    stamp = now.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    fields = {
        "alert_id": f"test_{secrets.token_hex(12)}", "kind": "threshold", "tenant": tenant,
        "budget_id": "test", "budget_name": "Test alert from Spendstream", "scope": {}, "window": "daily",
        "timezone": "UTC", "window_start": stamp, "window_end": None, "threshold": "80",
        "spent_usd": "8.000000000", "limit_usd": "10.000000000", "percent_used": "80.00",
        "projected_usd": None, "projected_at": None, "top": [], "event_id": "test", "event_time": stamp,
        "created_at": stamp, "channels": [], "test": True,
    }  # fmt: skip
    return Alert(fields["alert_id"], tenant, "threshold", (), fields)


def outcome_of_test_delivery(verdict: str) -> str:
    """The recorded outcome of a test delivery: one attempt, never retried."""
    return {"delivered": DELIVERED, "refused": REFUSED}.get(verdict, GAVE_UP)


# ---------------------------------------------------------------------------------- retries

Verdict = Literal["delivered", "retry", "final"]


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
            when = when.replace(tzinfo=timezone.utc)
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
    verdict: str, attempt: int, elapsed_s: float, retry_after_s: float | None, policy: RetryPolicy,
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


# ------------------------------------------------------------------------------------- SSRF


class UnsafeTarget(ValueError):
    """A webhook URL or address the notify stage refuses to call."""


@dataclass(frozen=True)
class WebhookTarget:
    scheme: str
    host: str  # lower-case name or IP literal without brackets
    port: int


def parse_webhook_url(url: str) -> WebhookTarget:
    """Syntax rules: absolute http(s) URL with a host, no credentials, at most 2048 characters."""
    if len(url) > 2048:
        raise UnsafeTarget("URL longer than 2048 characters")
    if " " in url or has_control(url):
        raise UnsafeTarget("URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeTarget(f"not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeTarget("only http and https URLs are allowed")
    if not parts.hostname:
        raise UnsafeTarget("URL has no host")
    if parts.username is not None or parts.password is not None:
        raise UnsafeTarget("credentials in the URL are not allowed (put a token in the path or use a secret)")
    return WebhookTarget(scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80))


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: what webhook_allow_private unlocks: loopback and private/shared ranges (local receivers). Never
#: link-local (cloud metadata at 169.254.169.254), multicast, unspecified or reserved addresses.
_PRIVATE_KINDS = frozenset({"loopback", "private"})


def _addresses_to_judge(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """``ip`` and the IPv4 addresses it leads to. An IPv4-mapped (::ffff:a.b.c.d) or NAT64
    (64:ff9b::a.b.c.d) address IS its IPv4 address (Python files the IPv6 forms under
    "reserved"); 6to4 and Teredo addresses are judged as themselves and as their IPv4 ends."""
    if isinstance(ip, ipaddress.IPv4Address):
        return [ip]
    if ip.ipv4_mapped:
        return [ip.ipv4_mapped]
    if ip in _NAT64:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    out: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if ip.sixtofour:
        out.append(ip.sixtofour)
    if ip.teredo:
        out.extend(ip.teredo)
    return out


def _kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``ip`` is not a public unicast address, or None when it is."""
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private or not ip.is_global:
        # RFC 1918, ULA, CGNAT 100.64/10, documentation and benchmarking ranges, ...
        return "private"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "private"
    return None


def address_refusal(address: str, allow_private: bool = False) -> str | None:
    """None when the notify stage may connect to ``address``; else the reason it may not."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return f"{address!r} is not an IP address"
    for candidate in _addresses_to_judge(ip):
        kind = _kind(candidate)
        if kind is None or (allow_private and kind in _PRIVATE_KINDS):
            continue
        return f"{address} is a {kind} address" + ("" if kind in _PRIVATE_KINDS else " (never allowed)")
    return None


_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
#: dot-atom local part @ a host name with at least two labels; no quoting, comments, IP literals
_EMAIL = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})+")
EMAIL_MAX_LEN = 254  # RFC 5321's path limit less the angle brackets
_LOCAL_MAX_LEN = 64


def email_refusal(address: str) -> str | None:
    """None when ``address`` is exactly one plain addr-spec (name@example.com); else why not.
    Lists, display names, quoting, comments and anything that could add a header are refused."""
    if not isinstance(address, str) or not address:
        return "empty"
    if len(address) > EMAIL_MAX_LEN:
        return f"longer than {EMAIL_MAX_LEN} characters"
    if has_control(address):
        return "contains a control character (CR, LF, ...)"
    if address.count("@") != 1:
        return "exactly one address (one @) per channel"
    if any(c in address for c in ",;<>\"() "):
        return "one plain address only: no lists, display names, quoting or comments"
    if len(address.split("@", 1)[0]) > _LOCAL_MAX_LEN:
        return f"the part before @ is longer than {_LOCAL_MAX_LEN} characters"
    if not _EMAIL.fullmatch(address):
        return "not of the form name@example.com"
    # the header parser must read it back as this one address, unchanged
    try:
        parsed = Address(addr_spec=address).addr_spec
    except (ValueError, IndexError, HeaderParseError):
        return "not of the form name@example.com"
    return None if parsed == address else "not of the form name@example.com"


def channel_refusal(channel: str) -> str | None:
    """None when a budget's channel entry (a webhook id, or one e-mail address) may be stored."""
    if has_control(channel):
        return "contains a control character (CR, LF, ...)"
    return email_refusal(channel) if is_email_channel(channel) else None


def is_email_channel(channel_id: str) -> bool:
    """Budgets list webhook ids and e-mail addresses side by side; ids never contain '@'."""
    return "@" in channel_id
