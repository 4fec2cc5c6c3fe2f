"""Content-Encoding: gzip at the gateway (logic.decode_content): every member of a multi-member
body is decoded, the decoded size stays bounded across members, and bytes that are not a whole
member are a 400 naming the body."""

from __future__ import annotations

import gzip
import os
import time
import zlib

import pytest

from ingest_gateway.errors import BodyError
from ingest_gateway.logic import decode_content

LIMIT = 1024 * 1024


def refused(body: bytes, max_bytes: int = LIMIT, encoding: str = "gzip") -> BodyError:
    with pytest.raises(BodyError) as err:
        decode_content(body, encoding, max_bytes)
    return err.value


def test_every_member_is_decoded_in_order():
    parts = [b'{"project": "a"}\n', b'{"project": "b"}\n', b'{"project": "c"}\n']
    assert decode_content(b"".join(gzip.compress(p) for p in parts), "gzip", LIMIT) == b"".join(parts)


def test_members_larger_than_a_feeding_piece_and_many_small_ones():
    big = [os.urandom(50_000), b"x" * 200_000]  # incompressible and compressible, both cross pieces
    tiny = [f"{i}\n".encode() for i in range(2000)]
    body = b"".join(gzip.compress(p) for p in big + tiny)
    assert decode_content(body, "x-gzip", LIMIT) == b"".join(big + tiny)


def test_a_single_member_is_unchanged():
    assert decode_content(gzip.compress(b"[1, 2]"), "GZIP", LIMIT) == b"[1, 2]"
    assert decode_content(b"[1]", None, LIMIT) == b"[1]"
    assert decode_content(b"[1]", "identity", LIMIT) == b"[1]"


def test_the_decoded_size_is_bounded_across_members():
    member = gzip.compress(b" " * 600)  # each member alone is under the limit
    error = refused(member * 2, max_bytes=1024)
    assert (error.status, error.code, error.field) == (413, "body_too_large", "body")
    assert "decompressed" in error.message
    assert decode_content(member, "gzip", 1024) == b" " * 600


@pytest.mark.parametrize(
    "body",
    [
        gzip.compress(b"[1]") + b"garbage after the member",
        gzip.compress(b"[1]") + gzip.compress(b"[2]")[:-5],  # the second member is cut short
        gzip.compress(b"[1]") + b"\x1f",  # the start of a member header only
        gzip.compress(b"[1]")[:-1],
        b"not gzip at all",
        b"",
    ],
    ids=["trailing-garbage", "truncated-second-member", "partial-header", "truncated", "not-gzip", "empty"],
)
def test_what_is_not_whole_members_is_400_naming_the_body(body):
    error = refused(body)
    assert (error.status, error.code, error.field) == (400, "bad_gzip", "body")


def test_an_unsupported_encoding_names_the_header():
    error = refused(zlib.compress(b"[1]"), encoding="deflate")
    assert (error.status, error.field) == (415, "content-encoding")


def test_decoding_stays_linear_in_many_empty_members():
    body = gzip.compress(b"", mtime=0) * (5 * 1024 * 1024 // 20)  # 5 MiB of 20-byte members
    started = time.process_time()
    assert decode_content(body, "gzip", LIMIT) == b""
    # measured ~0.2 s; a decoder copying what follows each member would take minutes
    assert time.process_time() - started < 5
