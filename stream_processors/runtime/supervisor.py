"""Several stages from one command: each stage runs as a child process (``spendstream processors
--stages <stage>``, the same command with a single stage), so a stage can crash, be killed or be
profiled alone and the stages use more than one core. The supervisor only watches them and serves,
on ``settings.processors.web_port``, ``/healthz`` (200 when every stage is healthy) and ``/metrics``
(every child's metrics, aggregated by prometheus_client's multiprocess collector). If a child dies
the others are stopped and the exit code is passed on, so the orchestrator (Kubernetes,
`spendstream dev`) restarts the whole unit.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from spendstream.ports import free_port
from spendstream.settings import Settings, settings_env

log = logging.getLogger("spendstream.processors")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class _Child:
    def __init__(self, stage: str, settings: Settings, metrics_dir: str):
        self.stage = stage
        self.web_port = free_port()
        env = {
            **os.environ,
            **settings_env(settings),
            "SPENDSTREAM_PROCESSORS__WEB_PORT": str(self.web_port),
            METRICS_DIR_ENV: metrics_dir,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spendstream.cli", "processors", "--stages", stage], env=env
        )

    def healthy(self) -> bool:
        import httpx

        try:
            return httpx.get(f"http://127.0.0.1:{self.web_port}/healthz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False


def supervise(settings: Settings, stages: list[str]) -> int:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    with tempfile.TemporaryDirectory(prefix="spendstream-metrics-") as metrics_dir:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=metrics_dir)
        children = [_Child(stage, settings, metrics_dir) for stage in stages]

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path == "/healthz":
                    unhealthy = [c.stage for c in children if not c.healthy()]
                    body = (f"unhealthy: {', '.join(unhealthy)}" if unhealthy else "ok").encode()
                    self._reply(503 if unhealthy else 200, body, "text/plain")
                elif self.path == "/metrics":
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                else:
                    self._reply(404, b"not found", "text/plain")

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("0.0.0.0", settings.processors.web_port), Handler)
        threading.Thread(target=server.serve_forever, name="processors-web", daemon=True).start()
        log.info("stages %s running as pids %s", stages, [c.proc.pid for c in children])
        exit_code = 0
        try:
            while not stopping.wait(0.5):
                dead = [c for c in children if c.proc.poll() is not None]
                if dead:
                    exit_code = dead[0].proc.returncode or 1
                    log.error("stage %s exited with %s; stopping the others", dead[0].stage, dead[0].proc.returncode)
                    break
        finally:
            server.shutdown()
            _stop_children(children)
        return exit_code


def _stop_children(children: list[_Child], grace: float = 30.0) -> None:
    for child in children:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()
