"""What every alert channel type provides. Pure.

A channel type (one module in this package) is a :class:`WebhookChannelType` (one HTTP POST per
alert, sent by ``Sender`` to a checked address) or a :class:`MailChannelType` (one e-mail through
the configured SMTP server). It says:

- ``name``: its format, as stored in ``webhooks.format`` and given to ``POST /v1/webhooks``;
- ``validate``: the API's ``url`` / ``email`` / ``secret`` -> a :class:`NewChannel`, or
  :class:`ChannelRefused` naming the field (a webhook's URL is then checked against the SSRF rules
  by ``channels.validate_channel``, for every webhook type alike);
- ``masked``: what ``GET /v1/webhooks`` shows of a stored channel (secrets never in full);
- ``build_request`` / ``build_message``: what is sent for an alert;
- ``endpoint``: what its deliveries share a concurrency limit on (a URL, the SMTP server).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from typing import ClassVar
from urllib.parse import urlsplit

from spendstream.alerting.payloads import Alert, has_control

USER_AGENT = "Spendstream-Notify/1"
IDEMPOTENCY_HEADER = "Idempotency-Key"


@dataclass(frozen=True)
class Channel:
    """Where one copy of an alert goes. ``id`` is what the budget lists: a webhook id or an address."""

    id: str
    format: str  # a registered channel type's name
    url: str = ""
    email: str = ""
    secret: str = ""


@dataclass(frozen=True)
class ChannelRequest:
    """What ``POST /v1/webhooks`` was given for a new channel (None: not given)."""

    url: str | None = None
    email: str | None = None
    secret: str | None = None


@dataclass(frozen=True)
class NewChannel:
    """A valid new channel, normalised (defaults filled in)."""

    format: str
    url: str = ""
    email: str = ""
    secret: str = ""
    #: the secret was made here: the creation response shows it, once
    secret_generated: bool = False


class ChannelRefused(ValueError):
    """A new channel's ``field`` is not acceptable; ``message`` says why."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class HttpRequest:
    url: str
    headers: dict[str, str]
    body: bytes


def mask_secret(text: str) -> str:
    return "" if not text else ("****" + text[-4:] if len(text) >= 12 else "****")


def masked_url(url: str) -> str:
    """Scheme, host and path; a query string may carry a token, so only its presence is shown."""
    if not url:
        return url
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" + ("?****" if parts.query else "")


def masked(channel: Channel) -> dict[str, str]:
    """The display of a stored channel's ``url``, ``email`` and ``secret`` (the default rule)."""
    return {"url": masked_url(channel.url), "email": channel.email, "secret": mask_secret(channel.secret)}


class ChannelType(ABC):
    name: ClassVar[str]

    @abstractmethod
    def validate(self, given: ChannelRequest) -> NewChannel:
        """Raises ChannelRefused naming the field."""

    def masked(self, channel: Channel) -> dict[str, str]:
        return masked(channel)

    @abstractmethod
    def endpoint(self, channel: Channel) -> str: ...


class WebhookChannelType(ChannelType):
    """One JSON POST per alert to the channel's URL. Subclasses give the body (``payload``), and
    may add headers, default the URL or require a secret."""

    #: the URL when the API is given none (None: a URL is required)
    default_url: ClassVar[str | None] = None
    #: why a secret is required (None: it is optional)
    secret_required: ClassVar[str | None] = None

    def validate(self, given: ChannelRequest) -> NewChannel:
        if given.email is not None:
            if given.url is not None:
                raise ChannelRefused("url", "give either url or email, not both")
            raise ChannelRefused("format", "an email channel has format 'email'")
        url = given.url or self.default_url
        if url is None:
            raise ChannelRefused("url", "required (or give an email)")
        if self.secret_required and not given.secret:
            raise ChannelRefused("secret", self.secret_required)
        if given.secret is not None and has_control(given.secret):
            raise ChannelRefused("secret", "contains a control character (CR, LF, ...)")
        return self.with_secret(NewChannel(self.name, url=url, secret=given.secret or ""))

    def with_secret(self, new: NewChannel) -> NewChannel:
        """``new`` as stored: a type that signs may make a secret when none was given."""
        return new

    def endpoint(self, channel: Channel) -> str:
        # per URL, so two tenants' webhooks on one host stay independent
        return channel.url

    @abstractmethod
    def payload(self, channel: Channel, alert: Alert, now: float) -> tuple[bytes, dict[str, str]]:
        """(body, headers of this type) for ``alert`` at unix time ``now``."""

    def build_request(self, channel: Channel, alert: Alert, now: float) -> HttpRequest:
        """The POST for ``alert`` at unix time ``now`` (a signature's timestamp)."""
        body, own_headers = self.payload(channel, alert, now)
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, IDEMPOTENCY_HEADER: alert.alert_id,
                   **own_headers}  # fmt: skip
        # refused here with a reason; the HTTP library would fail it as a transport error, and retry it
        unsafe = [name for name, value in headers.items() if has_control(value)]
        if unsafe:
            raise ValueError(f"control character in header {', '.join(unsafe)}")
        return HttpRequest(channel.url, headers, body)


class MailChannelType(ChannelType):
    """One e-mail per alert through the configured SMTP server."""

    def endpoint(self, channel: Channel) -> str:
        return "smtp"

    @abstractmethod
    def build_message(self, channel: Channel, alert: Alert, sender: str, now: datetime) -> EmailMessage:
        """Raises ValueError when the channel's recipient is refused."""
