"""Reading a request body under a size limit, for the ASGI front doors of both services.

A body is refused as soon as it is known to pass the limit: a declared Content-Length above it
before any byte is read, otherwise when the bytes received so far pass it. So neither a body sent
without Content-Length (chunked) nor one longer than it declared makes a service buffer more than
the limit.
"""

from __future__ import annotations

from starlette.types import Receive


class BodyTooLarge(Exception):
    def __init__(self, max_bytes: int):
        super().__init__(f"the request body exceeds {max_bytes} bytes")
        self.max_bytes = max_bytes


class ClientGone(Exception):
    """The client disconnected before sending its whole body."""


async def read_body(receive: Receive, content_length: bytes | str | None, max_bytes: int) -> bytes:
    """The whole body, or BodyTooLarge before more than ``max_bytes`` of it are buffered."""
    if _declared_length(content_length) > max_bytes:
        raise BodyTooLarge(max_bytes)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(max_bytes)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _declared_length(content_length: bytes | str | None) -> int:
    """The declared length, 0 when absent or not a number (the count of received bytes still holds)."""
    text = content_length.decode("latin-1") if isinstance(content_length, bytes) else content_length or ""
    if not (text.isascii() and text.isdigit()):
        return 0
    # int() refuses strings of thousands of digits; 19 digits are already more than any limit
    return int(text[:19])
