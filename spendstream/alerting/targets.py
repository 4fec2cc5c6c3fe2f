"""Where an alert may be sent: the SSRF rules for webhook URLs and addresses, and the one-address
rule for e-mail. Pure, except :func:`resolve_checked`, which asks the resolver.

- ``parse_webhook_url``: syntax (absolute http(s), a host, no credentials, no control characters).
- ``address_refusal``: which IP addresses may be connected to (public unicast; loopback and
  private ranges only with ``notify.webhook.allow_private``; link-local such as the cloud
  metadata address, multicast, unspecified and reserved never).
- ``resolve_checked``: the host resolved now and EVERY address it got checked; the caller then
  connects to the checked address (never resolves again: DNS rebinding).
- ``email_refusal`` / ``channel_refusal``: a recipient is one plain address or nothing (a list,
  a display name or a line break would add recipients or headers); a budget's channel entry (a
  webhook id or an address) holds no control character. The query API refuses these up front,
  the notify stage again when it sends (rows stored before the rules).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.headerregistry import Address
from urllib.parse import urlsplit

from spendstream.alerting.payloads import has_control


class UnsafeTarget(ValueError):
    """A webhook URL or address the notify stage refuses to call."""


@dataclass(frozen=True)
class WebhookTarget:
    scheme: str
    host: str  # lower-case name or IP literal without brackets
    port: int


def parse_webhook_url(url: str) -> WebhookTarget:
    """Syntax rules: absolute http(s) URL with a host, no credentials, at most 2048 characters."""
    if len(url) > 2048:
        raise UnsafeTarget("URL longer than 2048 characters")
    if " " in url or has_control(url):
        raise UnsafeTarget("URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeTarget(f"not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeTarget("only http and https URLs are allowed")
    if not parts.hostname:
        raise UnsafeTarget("URL has no host")
    if parts.username is not None or parts.password is not None:
        raise UnsafeTarget("credentials in the URL are not allowed (put a token in the path or use a secret)")
    return WebhookTarget(scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80))


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: what notify.webhook.allow_private unlocks: loopback and private/shared ranges (local receivers). Never
#: link-local (cloud metadata at 169.254.169.254), multicast, unspecified or reserved addresses.
_PRIVATE_KINDS = frozenset({"loopback", "private"})


def _addresses_to_judge(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """``ip`` and the IPv4 addresses it leads to. An IPv4-mapped (::ffff:a.b.c.d) or NAT64
    (64:ff9b::a.b.c.d) address IS its IPv4 address (Python files the IPv6 forms under
    "reserved"); 6to4 and Teredo addresses are judged as themselves and as their IPv4 ends."""
    if isinstance(ip, ipaddress.IPv4Address):
        return [ip]
    if ip.ipv4_mapped:
        return [ip.ipv4_mapped]
    if ip in _NAT64:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    out: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if ip.sixtofour:
        out.append(ip.sixtofour)
    if ip.teredo:
        out.extend(ip.teredo)
    return out


def _kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``ip`` is not a public unicast address, or None when it is."""
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private or not ip.is_global:
        # RFC 1918, ULA, CGNAT 100.64/10, documentation and benchmarking ranges, ...
        return "private"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "private"
    return None


def address_refusal(address: str, allow_private: bool = False) -> str | None:
    """None when the notify stage may connect to ``address``; else the reason it may not."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return f"{address!r} is not an IP address"
    for candidate in _addresses_to_judge(ip):
        kind = _kind(candidate)
        if kind is None or (allow_private and kind in _PRIVATE_KINDS):
            continue
        return f"{address} is a {kind} address" + ("" if kind in _PRIVATE_KINDS else " (never allowed)")
    return None


async def resolve_checked(url: str, allow_private: bool, timeout_s: float) -> tuple[WebhookTarget, str]:
    """(target, the address to connect to). Raises UnsafeTarget (refused: a syntax rule, or one of
    the host's addresses is not allowed) or OSError (the name does not resolve now)."""
    target = parse_webhook_url(url)
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM), timeout_s)
    except TimeoutError:
        raise OSError(f"resolving {target.host} timed out") from None
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve {target.host}: {exc.strerror or exc}") from None
    except UnicodeError:
        # the IDNA encoding refuses the name (an empty or over-long label): no later attempt can succeed
        raise UnsafeTarget(f"{target.host!r} is not a valid host name") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise OSError(f"{target.host} has no address")
    # every address, not just the first: a host answering with one public and one private
    # address would otherwise reach the private one on a later connection
    for address in addresses:
        reason = address_refusal(address, allow_private)
        if reason:
            raise UnsafeTarget(f"{target.host} resolves to {reason}" if address != target.host else reason)
    return target, addresses[0]


# ----------------------------------------------------------------------------------- e-mail

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
#: dot-atom local part @ a host name with at least two labels; no quoting, comments, IP literals
_EMAIL = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})+")
EMAIL_MAX_LEN = 254  # RFC 5321's path limit less the angle brackets
_LOCAL_MAX_LEN = 64


def email_refusal(address: str) -> str | None:
    """None when ``address`` is exactly one plain addr-spec (name@example.com); else why not.
    Lists, display names, quoting, comments and anything that could add a header are refused."""
    if not isinstance(address, str) or not address:
        return "empty"
    if len(address) > EMAIL_MAX_LEN:
        return f"longer than {EMAIL_MAX_LEN} characters"
    if has_control(address):
        return "contains a control character (CR, LF, ...)"
    if address.count("@") != 1:
        return "exactly one address (one @) per channel"
    if any(c in address for c in ',;<>"() '):
        return "one plain address only: no lists, display names, quoting or comments"
    if len(address.split("@", 1)[0]) > _LOCAL_MAX_LEN:
        return f"the part before @ is longer than {_LOCAL_MAX_LEN} characters"
    if not _EMAIL.fullmatch(address):
        return "not of the form name@example.com"
    # the header parser must read it back as this one address, unchanged
    try:
        parsed = Address(addr_spec=address).addr_spec
    except (ValueError, IndexError, HeaderParseError):
        return "not of the form name@example.com"
    return None if parsed == address else "not of the form name@example.com"


def channel_refusal(channel: str) -> str | None:
    """None when a budget's channel entry (a webhook id, or one e-mail address) may be stored."""
    if has_control(channel):
        return "contains a control character (CR, LF, ...)"
    return email_refusal(channel) if is_email_channel(channel) else None


def is_email_channel(channel_id: str) -> bool:
    """Budgets list webhook ids and e-mail addresses side by side; ids never contain '@'."""
    return "@" in channel_id
