"""Free local ports for listeners: the processors' supervisor gives each stage child one, the
embedded stack and the tests take theirs from here too."""

from __future__ import annotations

import random
import socket
from pathlib import Path

#: where ports for local listeners are drawn from when the OS names no ephemeral range
_LISTEN_RANGE = (10_000, 32_767)


def _listen_range() -> tuple[int, int]:
    """Ports below the OS's ephemeral range. A port handed out by binding port 0 comes FROM that
    range, which the OS also uses for outgoing connections: between our check and the listener's
    bind, any client connection (to the broker, ClickHouse, ...) could take it. Below the range
    only another listener can."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _LISTEN_RANGE
    return (_LISTEN_RANGE[0], low - 1) if low - 1 >= _LISTEN_RANGE[0] + 1_000 else _LISTEN_RANGE


def _bindable(port: int, host: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port_run(count: int, host: str = "127.0.0.1") -> int:
    """A port p with p .. p+count-1 all free right now (stage workers listen on web_port + i).
    Another process may still take one before the caller binds it; drawn at random from below the
    ephemeral range, that takes another listener picking the same port in that moment."""
    low, high = _listen_range()
    while True:
        first = random.randint(low, high - count + 1)
        if all(_bindable(port, host) for port in range(first, first + count)):
            return first


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now for a local listener (see :func:`free_port_run`)."""
    return free_port_run(1, host)
