"""The invite e-mail, sent when an SMTP server is configured (``notify.smtp``, as for alerts).

The token is in the body, to be pasted into the dashboard's "accept invite" form; it is never
put in a link (URLs end up in logs and browser history)."""

from __future__ import annotations

import smtplib
import ssl
from datetime import datetime
from email.message import EmailMessage

from spendstream.settings import Settings


def invite_message(to: str, org_name: str, inviter: str, role: str, token: str, expires_at: datetime,
                   sender: str) -> EmailMessage:  # fmt: skip
    msg = EmailMessage()
    msg["Subject"] = f"[Spendstream] You are invited to {org_name}"
    msg["From"] = sender
    msg["To"] = to
    msg.set_content(
        f"{inviter} invited you to the Spendstream organisation {org_name} as {role}.\n\n"
        'Open the Spendstream dashboard, choose "Accept an invite" and paste this invite token:\n\n'
        f"    {token}\n\n"
        f"It works once, until {expires_at.isoformat(timespec='minutes')}.\n"
    )
    return msg


def send(settings: Settings, message: EmailMessage) -> None:
    """Blocking: call it from a worker thread. Raises on any SMTP failure."""
    smtp = settings.notify.smtp
    with smtplib.SMTP(smtp.host, smtp.port, timeout=settings.notify.timeout_s) as client:
        if smtp.starttls:
            client.starttls(context=ssl.create_default_context())
        if smtp.username:
            client.login(smtp.username, smtp.password.get_secret_value())
        client.send_message(message)
