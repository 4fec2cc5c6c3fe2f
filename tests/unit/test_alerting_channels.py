"""The alert channel registry (spendstream/alerting/channels): every registered type validates,
masks and builds; every module in the package is registered; the query API accepts exactly the
registry's formats, and refuses what each type refuses, naming the field."""

from __future__ import annotations

import asyncio
import importlib
import json
import pkgutil
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import orjson
import pytest

import spendstream.alerting.channels as channels_package
from spendstream.alerting import (
    CHANNEL_FORMATS,
    CHANNEL_TYPES,
    IDEMPOTENCY_HEADER,
    Channel,
    ChannelRefused,
    ChannelRequest,
    HttpRequest,
    MailChannelType,
    Sender,
    WebhookChannelType,
    endpoint_of,
    masked_channel,
    parse_alert,
    validate_channel,
)
from spendstream.settings import Settings

RAW = (Path(__file__).parent.parent / "fixtures" / "budget_alert_v1.json").read_bytes()
NOW = datetime(2024, 3, 31, 9, 15, 3, tzinfo=UTC)
#: an IP literal: resolving it needs no DNS
PUBLIC_URL = "https://93.184.216.34/services/T000/B000/XXXXsecretXXXX?token=abc"
SECRET = "s3cret-routing-key-0123"
ADDRESS = "oncall@example.com"
TYPES = list(CHANNEL_TYPES.values())


def request_for(kind) -> ChannelRequest:
    if isinstance(kind, MailChannelType):
        return ChannelRequest(email=ADDRESS)
    return ChannelRequest(url=PUBLIC_URL, secret=SECRET)


def stored(kind) -> Channel:
    new = kind.validate(request_for(kind))
    return Channel("wh_1", new.format, url=new.url, email=new.email, secret=new.secret)


def validate(fmt: str | None, allow_private: bool = False, **given) -> object:
    return asyncio.run(validate_channel(fmt, ChannelRequest(**given), allow_private=allow_private, timeout_s=2.0))


# ----------------------------------------------------------------------------- the registry


def test_every_channel_module_is_registered_under_its_own_name():
    modules = [m.name for m in pkgutil.iter_modules(channels_package.__path__) if m.name != "base"]
    assert sorted(modules) == sorted(CHANNEL_FORMATS)
    for name in modules:
        module = importlib.import_module(f"spendstream.alerting.channels.{name}")
        assert CHANNEL_TYPES[name] is module.CHANNEL and module.CHANNEL.name == name


def test_every_type_has_one_transport():
    for kind in TYPES:
        assert isinstance(kind, (WebhookChannelType, MailChannelType)), kind.name


@pytest.mark.parametrize("kind", TYPES, ids=lambda k: k.name)
def test_every_type_validates(kind):
    new = validate(kind.name, **vars(request_for(kind)))
    assert new.format == kind.name
    if isinstance(kind, MailChannelType):
        assert (new.email, new.url, new.secret) == (ADDRESS, "", "")
    else:
        assert (new.url, new.secret, new.email) == (PUBLIC_URL, SECRET, "")


@pytest.mark.parametrize("kind", TYPES, ids=lambda k: k.name)
def test_every_type_masks_secrets_and_url_tokens(kind):
    shown = masked_channel(stored(kind))
    assert set(shown) == {"url", "email", "secret"}
    assert SECRET not in json.dumps(shown) and "token=abc" not in shown["url"]
    assert shown["secret"] in ("", "****" + SECRET[-4:])


def test_a_slack_url_is_its_credential_so_only_its_end_is_shown():
    shown = masked_channel(stored(CHANNEL_TYPES["slack"]))
    assert shown["url"] == "https://93.184.216.34/****XXXX"


@pytest.mark.parametrize("kind", TYPES, ids=lambda k: k.name)
def test_every_type_builds_what_it_sends(kind):
    alert, channel = parse_alert(RAW), stored(kind)
    if isinstance(kind, MailChannelType):
        message = kind.build_message(channel, alert, "spendstream@example.com", NOW)
        assert isinstance(message, EmailMessage) and message["To"] == ADDRESS
        assert message["X-Spendstream-Alert-Id"] == alert.alert_id
        assert endpoint_of(channel) == "smtp"
    else:
        request = kind.build_request(channel, alert, NOW.timestamp())
        assert isinstance(request, HttpRequest) and request.url == PUBLIC_URL
        assert request.headers[IDEMPOTENCY_HEADER] == alert.alert_id
        assert request.headers["Content-Type"] == "application/json" and isinstance(orjson.loads(request.body), dict)
        assert endpoint_of(channel) == PUBLIC_URL


@pytest.mark.parametrize("kind", [k for k in TYPES if isinstance(k, WebhookChannelType)], ids=lambda k: k.name)
def test_every_webhook_type_is_checked_against_ssrf(kind):
    with pytest.raises(ChannelRefused) as refused:
        validate(kind.name, url="http://169.254.169.254/latest/meta-data/", secret=SECRET, allow_private=True)
    assert refused.value.field == "url" and "link-local" in refused.value.message
    with pytest.raises(ChannelRefused) as refused:
        validate(kind.name, url="http://127.0.0.1:9/h", secret=SECRET)
    assert refused.value.field == "url" and "loopback" in refused.value.message
    assert (
        validate(kind.name, url="http://127.0.0.1:9/h", secret=SECRET, allow_private=True).url == "http://127.0.0.1:9/h"
    )


def test_a_channel_of_an_unregistered_format_is_refused_not_sent():
    async def send():
        sender = Sender(Settings())
        try:
            return await sender.send(Channel("wh_1", "teams", url=PUBLIC_URL), parse_alert(RAW))
        finally:
            await sender.close()

    result = asyncio.run(send())
    assert (result.verdict, result.error) == ("refused", "unknown channel format 'teams'")
    assert masked_channel(Channel("wh_1", "teams", url=PUBLIC_URL, secret=SECRET))["secret"] == "****0123"
    assert endpoint_of(Channel("wh_1", "teams", url=PUBLIC_URL)) == PUBLIC_URL


# ---------------------------------------------------------------------- what the API refuses


@pytest.mark.parametrize(
    "fmt, given, field, message",
    [(None, {"email": "a@example.com", "url": PUBLIC_URL}, "url", "give either url or email, not both"),
     ("slack", {"email": "a@example.com"}, "format", "an email channel has format 'email'"),
     ("email", {"email": "a@example.com", "url": PUBLIC_URL}, "url", "give either url or email, not both"),
     (None, {"email": "a@example.com", "secret": SECRET}, "secret", "e-mail channels take no secret"),
     (None, {"email": "A <a@example.com>"}, "email", "not a plain e-mail address (name@example.com): one plain"),
     ("email", {}, "email", "required for format 'email'"),
     ("email", {"url": PUBLIC_URL}, "email", "required for format 'email'"),
     ("generic", {}, "url", "required (or give an email)"),
     (None, {}, "url", "required (or give an email)"),
     ("pagerduty", {}, "secret", "the PagerDuty integration's routing key is required"),
     (None, {"url": PUBLIC_URL, "secret": "abc\r\ndefgh"}, "secret", "contains a control character"),
     (None, {"url": "ftp://example.com/x"}, "url", "not allowed: only http and https"),
     ("teams", {"url": PUBLIC_URL}, "format", "one of generic, slack, pagerduty, email")],
)  # fmt: skip
def test_refusals_name_the_field(fmt, given, field, message):
    with pytest.raises(ChannelRefused) as refused:
        validate(fmt, **given)
    assert refused.value.field == field and message in refused.value.message


def test_defaults():
    assert validate(None, email=ADDRESS).format == "email"
    generic = validate(None, url=PUBLIC_URL)
    assert generic.format == "generic" and generic.secret_generated and generic.secret.startswith("whsec_")
    assert not validate(None, url=PUBLIC_URL, secret=SECRET).secret_generated
    assert not validate("slack", url=PUBLIC_URL).secret_generated


def test_the_query_api_accepts_exactly_the_registered_formats():
    from pydantic import ValidationError

    from query_api.app import create_app
    from query_api.routers.webhooks import WebhookIn

    schema = create_app(Settings()).openapi()["components"]["schemas"]["WebhookIn"]["properties"]["format"]
    [enum] = [s["enum"] for s in schema["anyOf"] if "enum" in s]
    assert enum == list(CHANNEL_FORMATS)
    for name in CHANNEL_FORMATS:
        assert WebhookIn(format=name).format == name
    with pytest.raises(ValidationError):
        WebhookIn(format="teams")
