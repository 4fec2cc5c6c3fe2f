"""The dashboard as a person, in headless Chromium (Debian package) against a running query API:
log in with e-mail and password, see the dashboard of the first organisation, switch to another
(where the person is a viewer: no members panel), switch back, invite a member who joins from
their own browser, change their role, and check that no token ever reaches localStorage."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
from identity_support import IDENTITY, PASSWORD, bearer, invite_and_accept, login, register  # noqa: E402
from query_api_stack import QueryApiServer, insert_events, make_events, migrate  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.clickhouse,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (make browser-deps installs it)"),
]
SCREENSHOT_DIR = Path(os.environ.get("SPENDSTREAM_SCREENSHOT_DIR", "/tmp"))


@pytest.fixture(scope="module")
def two_orgs(make_settings):
    settings = make_settings(identity=IDENTITY)
    migrate(settings)
    with QueryApiServer(settings) as server, httpx.Client(base_url=server.url, timeout=60.0) as api:
        org_a = register(api, "alice@example.com", "Alice", org_name="Acme")["org"]["id"]
        org_b = register(api, "bob@example.com", "Bob", org_name="Bobco")["org"]["id"]
        invite_and_accept(api, login(api, "bob@example.com")["access_token"], org_b, "alice@example.com", "viewer")
        now = datetime.now(UTC)
        events = {
            org_a: make_events(org_a, 300, now - timedelta(days=5), now - timedelta(minutes=1), seed=31),
            org_b: make_events(org_b, 200, now - timedelta(days=5), now - timedelta(minutes=1), seed=32),
        }
        insert_events(settings, events[org_a] + events[org_b])
        yield server, api, org_a, org_b, events


def _usd(events: list[dict]) -> str:
    return f"{sum(e['cost_nanos'] for e in events) / 1e9:.9f} USD"


def test_log_in_switch_organisation_invite_and_see_the_dashboard(two_orgs):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    server, api, org_a, org_b, events = two_orgs
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu",
                                                                     "--no-first-run", "--disable-sync"])  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(server.url + "/")
            page.fill("#login-email", "alice@example.com")
            page.fill("#login-password", PASSWORD)
            page.click("#login-form button[type=submit]")
            page.wait_for_selector("#user-bar:not([hidden])")
            assert page.is_hidden("#login-form")
            assert page.text_content("#user-name") == "Alice"
            options = page.eval_on_selector_all("#org-switch option", "els => els.map(e => [e.value, e.textContent])")
            assert sorted(options) == sorted([[org_a, "Acme"], [org_b, "Bobco"]])

            def shows(usd: str) -> None:
                page.wait_for_function("want => document.querySelector('[data-field=cost]').title === want", arg=usd)

            page.select_option("#org-switch", org_a)
            shows(_usd(events[org_a]))
            assert page.text_content("#org-role") == "owner"
            page.wait_for_selector("#members-panel:not([hidden])")

            page.select_option("#org-switch", org_b)  # a viewer there: Bobco's figures, no members panel
            shows(_usd(events[org_b]))
            assert page.text_content("#org-role") == "viewer"
            page.wait_for_selector("#members-panel", state="hidden")

            page.select_option("#org-switch", org_a)
            shows(_usd(events[org_a]))
            page.wait_for_selector("#members-panel:not([hidden]) #members tbody tr")
            page.fill("#invite-form input[name=email]", "carol@example.com")
            page.select_option("#invite-form select[name=role]", "member")
            page.click("#invite-form button[type=submit]")
            page.wait_for_selector("#invite-result:not([hidden])")
            token = page.text_content("#invite-token")
            assert token.startswith("ssi_")

            # the invitee joins from the dashboard in a browser of their own
            other = browser.new_page()
            other.goto(server.url + "/")
            other.click("#show-accept")
            other.fill("#accept-token", token)
            other.fill("#accept-name", "Carol")
            other.fill("#accept-password", PASSWORD)
            other.click("#accept-form button[type=submit]")
            other.wait_for_selector("#user-bar:not([hidden])")
            assert other.text_content("#org-role") == "member"
            other.wait_for_function(
                "want => document.querySelector('[data-field=cost]').title === want", arg=_usd(events[org_a])
            )
            assert other.is_hidden("#members-panel")
            carol_me = api.get("/auth/me", headers=bearer(login(api, "carol@example.com")["access_token"])).json()
            carol = carol_me["user"]["id"]
            # then the owner makes them an admin from the page
            page.select_option("#org-switch", org_b)
            page.select_option("#org-switch", org_a)
            row = f'#members tbody tr[data-user="{carol}"]'
            page.wait_for_selector(row)
            page.select_option(f"{row} select.member-role", "admin")
            page.wait_for_function("() => document.querySelector('#status').textContent === 'Role changed.'")
            carol_token = login(api, "carol@example.com")["access_token"]
            members = api.get(f"/v1/orgs/{org_a}/members", headers=bearer(carol_token)).json()["members"]
            assert {m["email"]: m["role"] for m in members}["carol@example.com"] == "admin"

            # tokens stay out of localStorage; the access token is in no storage at all
            assert page.evaluate("localStorage.length") == 0
            stored = page.evaluate("JSON.stringify(Object.assign({}, sessionStorage))")
            assert "eyJ" not in stored and "ssr_" in stored

            # a reload resumes the session from the tab's refresh token
            page.reload()
            page.wait_for_selector("#user-bar:not([hidden])")
            shows(_usd(events[org_a]))
            page.screenshot(path=str(SCREENSHOT_DIR / "spendstream-dashboard-login.png"), full_page=True)

            page.click("#logout")
            page.wait_for_selector("#login-form:not([hidden])")
            assert page.evaluate("sessionStorage.getItem('spendstream.refreshToken')") is None
        finally:
            browser.close()
