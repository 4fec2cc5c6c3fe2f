"""Local stand-ins for Kafka and ClickHouse (the embedded stack), and what they share."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (bind to port 0). Another process may take it
    before the caller binds it; every user of this module accepts that small race."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_port_run(count: int, host: str = "127.0.0.1") -> int:
    """A port p with p .. p+count-1 all free right now (stage workers listen on web_port + i)."""
    while True:
        first = free_port(host)
        try:
            for port in range(first + 1, first + count):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind((host, port))
            return first
        except OSError:
            continue
