"""The one key check both services run before reading a body (spendstream.keys.authenticate), and
the bounded body reader they share (spendstream.asgi.read_body)."""

from __future__ import annotations

import pytest

from spendstream import asgi
from spendstream.keys import AuthError, KeyStore, Principal, authenticate, check_scopes, presented_key

BOOTSTRAP = "bootstrap-admin-key-0123456789"


@pytest.mark.parametrize(
    ("authorization", "api_key", "expected"),
    [
        ("Bearer abc", None, "abc"),
        ("bearer   abc  ", None, "abc"),
        ("Bearer abc", "xyz", "abc"),  # Authorization wins, as FastAPI's HTTPBearer did
        ("Basic dXNlcjpwYXNz", "xyz", "xyz"),  # not a bearer token: the X-API-Key header counts
        (None, " xyz ", "xyz"),
        ("Bearer ", None, None),
        ("Bearer", "", None),
        (None, None, None),
    ],
)
def test_presented_key(authorization, api_key, expected):
    assert presented_key(authorization, api_key) == expected


async def test_authenticate_refuses_missing_and_unknown_keys_with_401():
    keys = KeyStore(None, bootstrap_key=BOOTSTRAP, bootstrap_tenant="acme")
    principal = await authenticate(keys, f"Bearer {BOOTSTRAP}")
    assert principal.tenant == "acme"
    assert (await authenticate(keys, None, BOOTSTRAP, ("ingest",))).tenant == "acme"
    for authorization, api_key in ((None, None), ("Bearer wrong", None), ("Token " + BOOTSTRAP, None),
                                   (None, "ss_0123456789abcdef_" + "x" * 30)):  # fmt: skip
        with pytest.raises(AuthError) as refused:
            await authenticate(keys, authorization, api_key)
        assert refused.value.status == 401


def test_scopes_are_checked_as_any_of():
    reader = Principal("k1", "acme", frozenset({"read"}))
    assert check_scopes(reader, ()) is reader
    assert check_scopes(reader, ("ingest", "read")) is reader
    with pytest.raises(AuthError) as refused:
        check_scopes(reader, ("admin",))
    assert refused.value.status == 403 and "'admin'" in refused.value.message


class Receive:
    """ASGI ``receive`` over given messages, counting how many were taken."""

    def __init__(self, *messages: dict):
        self.messages = list(messages)
        self.taken = 0

    async def __call__(self) -> dict:
        self.taken += 1
        return self.messages.pop(0)


def chunk(body: bytes, more: bool = True) -> dict:
    return {"type": "http.request", "body": body, "more_body": more}


async def test_read_body_joins_the_chunks_up_to_the_limit():
    receive = Receive(chunk(b"a" * 10), chunk(b"b" * 10), chunk(b"", more=False))
    assert await asgi.read_body(receive, None, 20) == b"a" * 10 + b"b" * 10


@pytest.mark.parametrize("declared", ["21", b"21", "9" * 5000])
async def test_a_declared_length_over_the_limit_is_refused_unread(declared):
    receive = Receive(chunk(b"x", more=False))
    with pytest.raises(asgi.BodyTooLarge):
        await asgi.read_body(receive, declared, 20)
    assert receive.taken == 0


@pytest.mark.parametrize("declared", [None, "5", "²", "-1", "abc"])
async def test_received_bytes_are_counted_whatever_the_declared_length(declared):
    receive = Receive(*(chunk(b"x" * 8) for _ in range(100)))
    with pytest.raises(asgi.BodyTooLarge) as refused:
        await asgi.read_body(receive, declared, 20)
    assert receive.taken == 3  # refused at the chunk that passed 20 bytes, the rest never read
    assert "20 bytes" in str(refused.value)


async def test_a_client_gone_mid_body_is_reported():
    with pytest.raises(asgi.ClientGone):
        await asgi.read_body(Receive(chunk(b"x"), {"type": "http.disconnect"}), None, 20)
