"""The alert channel types: one module each, registered in ``CHANNEL_TYPES``.

Adding a channel type (say ``teams``):
1. ``spendstream/alerting/channels/teams.py``: a subclass of ``WebhookChannelType`` (one JSON POST
   per alert: ``name``, ``payload``; optionally ``default_url``, ``secret_required``,
   ``with_secret``, ``masked``) or of ``MailChannelType``, and ``CHANNEL = Teams()``;
2. add ``teams.CHANNEL`` to ``_TYPES`` below;
3. ``tests/unit/test_alerting_channels.py`` checks every registered type (validates, masks,
   builds); add a test of its own body to that file or beside it.
Nothing else: the query API's ``format`` values (and its OpenAPI enum), its validation and
masking, the notify stage's sender and its concurrency per endpoint all read this registry, and
the SSRF checks apply to every webhook type. A new transport (neither HTTP POST nor SMTP) would
also need a branch in ``spendstream.alerting.sender``.
"""

from __future__ import annotations

from spendstream.alerting.channels import email, generic, pagerduty, slack
from spendstream.alerting.channels.base import (
    Channel,
    ChannelRefused,
    ChannelRequest,
    ChannelType,
    HttpRequest,
    MailChannelType,
    NewChannel,
    WebhookChannelType,
    masked,
)
from spendstream.alerting.targets import UnsafeTarget, resolve_checked

_TYPES: tuple[ChannelType, ...] = (generic.CHANNEL, slack.CHANNEL, pagerduty.CHANNEL, email.CHANNEL)

CHANNEL_TYPES: dict[str, ChannelType] = {t.name: t for t in _TYPES}
#: the formats ``POST /v1/webhooks`` accepts, in this order
CHANNEL_FORMATS: tuple[str, ...] = tuple(CHANNEL_TYPES)
#: the format of an address a budget lists directly as a channel
EMAIL_FORMAT = email.CHANNEL.name


def default_format(given: ChannelRequest) -> str:
    """A new channel that names no format: e-mail for an address, else a generic webhook."""
    return EMAIL_FORMAT if given.email is not None else generic.CHANNEL.name


async def validate_channel(
    fmt: str | None, given: ChannelRequest, *, allow_private: bool, timeout_s: float
) -> NewChannel:
    """The new channel ``given`` describes, its webhook URL checked against the SSRF rules now
    (the notify stage checks again before every delivery: DNS may change). Raises ChannelRefused."""
    kind = CHANNEL_TYPES.get(fmt or default_format(given))
    if kind is None:
        raise ChannelRefused("format", f"one of {', '.join(CHANNEL_FORMATS)}")
    new = kind.validate(given)
    if isinstance(kind, WebhookChannelType):
        try:
            await resolve_checked(new.url, allow_private, timeout_s)
        except UnsafeTarget as exc:
            raise ChannelRefused("url", f"not allowed: {exc}") from None
        except OSError as exc:
            raise ChannelRefused("url", str(exc)) from None
    return new


def masked_channel(channel: Channel) -> dict[str, str]:
    """What the API shows of a stored channel's ``url``, ``email`` and ``secret``."""
    kind = CHANNEL_TYPES.get(channel.format)
    # a row of a format not registered (any more) is shown by the default rule
    return kind.masked(channel) if kind is not None else masked(channel)


def endpoint_of(channel: Channel) -> str:
    """What deliveries to ``channel`` share a concurrency limit on."""
    kind = CHANNEL_TYPES.get(channel.format)
    return kind.endpoint(channel) if kind is not None else channel.url


__all__ = [
    "CHANNEL_FORMATS",
    "CHANNEL_TYPES",
    "EMAIL_FORMAT",
    "Channel",
    "ChannelRefused",
    "ChannelRequest",
    "ChannelType",
    "HttpRequest",
    "MailChannelType",
    "NewChannel",
    "WebhookChannelType",
    "default_format",
    "endpoint_of",
    "masked_channel",
    "validate_channel",
]
