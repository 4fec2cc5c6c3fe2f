"""A handle on an embedded ClickHouse server running as a child process.

The server runs in its own process because chDB allows one engine per process and one process
per data path; the dev stack and the tests start, stop, restart and kill it through this handle.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from spendstream.ports import free_port

STOP_GRACE_S = 15.0
_POLL_INTERVAL_S = 0.05


class EmbeddedClickHouse:
    """Runs ``spendstream embedded-clickhouse`` on ``path`` and waits until it answers /ping.

    The child gets its own process group so a terminal's Ctrl-C reaches only the supervisor, and
    its output goes to ``<path>.log`` beside the data directory (a pipe nobody reads would fill
    up and stall the server).
    """

    def __init__(self, path: str, port: int | None = None, host: str = "127.0.0.1"):
        self.path = str(Path(path).resolve())
        self.host = host
        self.port = port or free_port(host)
        self.log_path = self.path.rstrip("/") + ".log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 60.0) -> EmbeddedClickHouse:
        if self.running():
            return self
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        command = [
            sys.executable,
            "-m",
            "spendstream.cli",
            "embedded-clickhouse",
            "--port",
            str(self.port),
            "--path",
            self.path,
            "--host",
            self.host,
        ]
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while not self._answers_ping():
            if self._process.poll() is not None:
                self._close_log()
                raise RuntimeError(
                    f"embedded ClickHouse exited with code {self._process.returncode} during start-up; "
                    f"last log lines:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(
                    f"embedded ClickHouse not ready after {timeout:g}s; last log lines:\n{self.log_tail()}"
                )
            time.sleep(_POLL_INTERVAL_S)
        return self

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM (the server finishes in-flight requests and closes the engine), SIGKILL after ``grace``."""
        if self.running():
            self._signal(signal.SIGTERM)
            try:
                self._process.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()

    def kill(self) -> None:
        """SIGKILL, as a crash would: for recovery tests."""
        if self.running():
            self._signal(signal.SIGKILL)
            self._process.wait()
        self._close_log()

    def restart(self, timeout: float = 60.0) -> EmbeddedClickHouse:
        self.stop()
        return self.start(timeout)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> EmbeddedClickHouse:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _signal(self, signum: int) -> None:
        try:
            os.killpg(self._process.pid, signum)
        except ProcessLookupError:
            pass

    def _answers_ping(self) -> bool:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=1.0)
        try:
            conn.request("GET", "/ping")
            response = conn.getresponse()
            return response.status == 200 and response.read().startswith(b"Ok.")
        except OSError:
            return False
        finally:
            conn.close()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
