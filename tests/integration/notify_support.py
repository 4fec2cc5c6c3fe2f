"""Test support for the notify stage: a real HTTP receiver, a real SMTP server, alert records.

``Receiver``: an aiohttp server on a free loopback port, in the test's event loop. Each path
answers from a script (a list of statuses, the last one repeating) after an optional delay and
records every request it got (headers, body, arrival time).
``Mailbox``: aiosmtpd in its own thread, keeping every message (optionally requiring AUTH and STARTTLS).
``alert_value``: a budget.alerts value of contract v1, from tests/fixtures/budget_alert_v1.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from spendstream.clickhouse import get_client
from spendstream.devstack import child_env
from spendstream.ports import free_port
from spendstream.settings import Settings

FIXTURE = Path(__file__).parent.parent / "fixtures" / "budget_alert_v1.json"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() on arrival
    status: int  # what the receiver answered
    wall: float  # time.time() on arrival, to compare with timestamps in the body

    def json(self) -> Any:
        return orjson.loads(self.body)


class Receiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[Received] = []
        self._scripts: dict[str, list[int]] = {}
        self._delays: dict[str, float] = {}
        self._headers: dict[str, dict[str, str]] = {}
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def script(
        self, path: str, statuses: list[int], delay_s: float = 0.0, headers: dict[str, str] | None = None
    ) -> str:
        """Answer ``path`` with these statuses in turn (the last repeats); returns its URL."""
        self._scripts[path] = list(statuses)
        self._delays[path] = delay_s
        self._headers[path] = headers or {}
        return self.url(path)

    def at(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.path
        body = await request.read()
        arrived, wall = time.monotonic(), time.time()
        delay = self._delays.get(path, 0.0)
        if delay:
            await asyncio.sleep(delay)
        script = self._scripts.get(path, [200])
        status = script.pop(0) if len(script) > 1 else script[0]
        self.requests.append(Received(path, dict(request.headers), body, arrived, status, wall))
        return web.Response(status=status, text="ok" if status < 300 else "nope", headers=self._headers.get(path))

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


class Mailbox:
    """``users`` (login -> password): AUTH required; ``tls_context``: STARTTLS required first."""

    def __init__(self, users: dict[str, str] | None = None, tls_context: ssl.SSLContext | None = None) -> None:
        self.port = free_port()
        self.messages: list[tuple[list[str], Message]] = []
        #: (login, accepted) of every AUTH attempt
        self.logins: list[tuple[str, bool]] = []
        self._users = users
        options: dict[str, Any] = {}
        if users is not None:
            options |= {
                "authenticator": self._authenticate,
                "auth_required": True,
                "auth_require_tls": tls_context is not None,
            }
        if tls_context is not None:
            options |= {"tls_context": tls_context, "require_starttls": True}
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port, **options)

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        login, password = auth_data.login.decode(), auth_data.password.decode()
        accepted = self._users is not None and self._users.get(login) == password
        self.logins.append((login, accepted))
        return AuthResult(success=accepted, handled=False)  # handled=True: "I already answered"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd's name)
        self.messages.append((list(envelope.rcpt_tos), message_from_bytes(envelope.original_content)))
        return "250 OK"

    def __enter__(self) -> Mailbox:
        self._controller.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._controller.stop()


async def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 20.0, step: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(step)


def alert_value(alert_id: str, tenant: str, channels: list[str], **changes: Any) -> dict[str, Any]:
    data = json.loads(FIXTURE.read_text())
    data.update(alert_id=alert_id, tenant=tenant, channels=channels, **changes)
    return data


def insert_webhook(settings: Settings, tenant: str, webhook_id: str, fmt: str, url: str = "", secret: str = "",
                   email: str = "") -> None:  # fmt: skip
    """A webhooks row as the query API writes it."""
    now = datetime.now(UTC)
    client = get_client(settings)
    try:
        client.insert(
            "webhooks", [[tenant, webhook_id, fmt, url, email, secret, now, now, 0, time.time_ns() // 1000]],
            column_names=["tenant", "id", "format", "url", "email", "secret", "created_at", "updated_at", "deleted", "version"],
        )  # fmt: skip
    finally:
        client.close()


def deliveries(settings: Settings, tenant: str) -> list[dict[str, Any]]:
    """Every recorded attempt of ``tenant`` (after ReplacingMergeTree collapsing), in order."""
    client = get_client(settings)
    try:
        return list(client.query(
            "SELECT alert_id, channel, format, attempt, outcome, http_status, error FROM alert_deliveries FINAL"
            " WHERE tenant = {t:String} ORDER BY alert_id, channel, attempt", parameters={"t": tenant},
        ).named_results())  # fmt: skip
    finally:
        client.close()


class NotifyWorker:
    """``spendstream processors --stages notify`` as a child process in its own process group."""

    def __init__(self, settings: Settings, log_path: Path):
        self.health_url = f"http://127.0.0.1:{settings.processors.web_port}/healthz"
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "spendstream.cli", "processors", "--stages", "notify"],
                env={**os.environ, **child_env(settings)}, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        self.log_path = log_path

    async def ready(self, timeout: float = 60.0) -> None:
        async with httpx.AsyncClient() as http:

            async def healthy() -> bool:
                try:
                    return (await http.get(self.health_url, timeout=1.0)).status_code == 200
                except httpx.HTTPError:
                    return False

            deadline = time.monotonic() + timeout
            while not await healthy():
                assert self.proc.poll() is None, f"notify worker exited:\n{self.log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"notify worker not ready:\n{self.log_path.read_text()[-3000:]}"
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        os.killpg(self.proc.pid, 9)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
