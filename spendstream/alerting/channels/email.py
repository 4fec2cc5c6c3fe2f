"""E-mail: one message per alert to exactly one plain address (``targets.email_refusal``), with
a one-line subject and a ``Message-ID`` stable per (alert, recipient). Budgets may also list an
address directly as a channel (no ``webhooks`` row)."""

from __future__ import annotations

import hashlib
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime

from spendstream.alerting.channels.base import Channel, ChannelRefused, ChannelRequest, MailChannelType, NewChannel
from spendstream.alerting.payloads import Alert, detail_lines, summary
from spendstream.alerting.targets import email_refusal


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
    msg.set_content(summary(alert) + "\n\n" + "\n".join(detail_lines(alert)) + "\n")
    return msg


class Email(MailChannelType):
    name = "email"

    def validate(self, given: ChannelRequest) -> NewChannel:
        if given.email is None:
            raise ChannelRefused("email", f"required for format '{self.name}'")
        if given.url is not None:
            raise ChannelRefused("url", "give either url or email, not both")
        if given.secret is not None:
            raise ChannelRefused("secret", "e-mail channels take no secret")
        refusal = email_refusal(given.email)
        if refusal:
            raise ChannelRefused("email", f"not a plain e-mail address (name@example.com): {refusal}")
        return NewChannel(self.name, email=given.email)

    def build_message(self, channel: Channel, alert: Alert, sender: str, now: datetime) -> EmailMessage:
        return email_message(alert, channel.email, sender, now)


CHANNEL = Email()
