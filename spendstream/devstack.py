"""`spendstream dev`: the whole stack on the embedded broker and ClickHouse, supervised.

``Stack`` is also what the e2e tests, the fault suite and the benchmarks start, so every one of
them runs the same processes the same way: each component is a `spendstream <command>` child
process with its settings passed as SPENDSTREAM_* environment variables, a health check, and a
restart when it dies (logged).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from spendstream.settings import Settings

log = logging.getLogger("spendstream.dev")

#: stream stages, each run as its own worker process so one can be killed on purpose
STAGES = ("pricing", "budgets", "notify", "sink")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    return check


def _tcp_ok(port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    return check


@dataclass
class Component:
    name: str
    argv: list[str]
    healthy: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    #: called after each (re)start once healthy, e.g. to recreate topics on a memory-only broker
    after_start: Callable[[], None] | None = None
    proc: subprocess.Popen | None = None
    restarts: int = 0


class Stack:
    """Start, supervise, kill and restart the embedded stack's processes."""

    def __init__(self, settings: Settings, data_dir: Path, components: tuple[str, ...] | None = None):
        self.settings = settings
        self.data_dir = data_dir
        self.log_dir = data_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = child_env(settings)
        self._components = {c.name: c for c in self._plan() if components is None or c.name in components}
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None

    # -- the plan ---------------------------------------------------------------------------
    def _plan(self) -> list[Component]:
        s = self.settings
        cli = [sys.executable, "-m", "spendstream.cli"]
        comps: list[Component] = []
        if s.kafka.embedded:
            port = s.kafka.embedded_port
            comps.append(
                Component("kafka", cli + ["embedded-kafka", "--port", str(port)], _tcp_ok(port),
                          after_start=self._ensure_topics)
            )
        if s.clickhouse.embedded:
            port = s.clickhouse.embedded_port
            path = str(Path(s.clickhouse.data_path).resolve())
            comps.append(
                Component("clickhouse", cli + ["embedded-clickhouse", "--port", str(port), "--path", path],
                          _http_ok(f"http://127.0.0.1:{port}/ping"), after_start=self._migrate)
            )
        comps.append(Component("gateway", cli + ["gateway"], _http_ok(self.gateway_url + "/readyz")))
        for i, stage in enumerate(STAGES):
            web_port = s.processors.web_port + i
            comps.append(
                Component(stage, cli + ["processors", "--stages", stage],
                          _http_ok(f"http://127.0.0.1:{web_port}/healthz"),
                          env={"SPENDSTREAM_PROCESSORS__WEB_PORT": str(web_port)})
            )
        comps.append(Component("query-api", cli + ["query-api"], _http_ok(self.query_url + "/readyz")))
        return comps

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.gateway.port}"

    @property
    def query_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.query_api.port}"

    def _ensure_topics(self) -> None:
        from spendstream.topics import ensure_topics_sync

        ensure_topics_sync(self.settings)

    def _migrate(self) -> None:
        from spendstream.migrate import main as migrate_main

        if migrate_main(self.settings) != 0:
            raise RuntimeError("migrations failed; see the message above")

    # -- process control --------------------------------------------------------------------
    def _spawn(self, comp: Component) -> None:
        logf = open(self.log_dir / f"{comp.name}.log", "ab")
        comp.proc = subprocess.Popen(
            comp.argv, env={**os.environ, **self.env, **comp.env}, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        logf.close()

    def _wait_healthy(self, comp: Component, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not comp.healthy():
            if comp.proc is not None and comp.proc.poll() is not None:
                raise RuntimeError(f"{comp.name} exited with {comp.proc.returncode}; see {self.log_dir / comp.name}.log")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{comp.name} not healthy after {timeout:.0f}s; see {self.log_dir / comp.name}.log")
            time.sleep(0.1)
        if comp.after_start:
            comp.after_start()

    def start_component(self, name: str, timeout: float = 60.0) -> None:
        comp = self._components[name]
        self._spawn(comp)
        self._wait_healthy(comp, timeout)

    def start(self, timeout: float = 90.0, supervise: bool = True) -> "Stack":
        for name in self._components:
            log.info("starting %s", name)
            self.start_component(name, timeout)
        if supervise:
            self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
            self._supervisor.start()
        return self

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a component on purpose; the supervisor restarts it."""
        comp = self._components[name]
        if comp.proc is not None and comp.proc.poll() is None:
            os.killpg(comp.proc.pid, sig)
            comp.proc.wait()

    def restarts(self, name: str) -> int:
        return self._components[name].restarts

    def is_healthy(self, name: str) -> bool:
        return self._components[name].healthy()

    def _supervise(self) -> None:
        while not self._stopping.wait(0.2):
            for comp in self._components.values():
                if self._stopping.is_set():
                    return
                if comp.proc is not None and comp.proc.poll() is not None:
                    with self._lock:
                        comp.restarts += 1
                        log.warning("%s died (exit %s); restarting (#%d)", comp.name, comp.proc.returncode,
                                    comp.restarts)
                        try:
                            self._spawn(comp)
                            self._wait_healthy(comp, 90.0)
                        except (RuntimeError, TimeoutError) as exc:
                            log.error("restart of %s failed: %s", comp.name, exc)

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor:
            self._supervisor.join(timeout=5)
        for comp in reversed(list(self._components.values())):
            if comp.proc is None or comp.proc.poll() is not None:
                continue
            os.killpg(comp.proc.pid, signal.SIGTERM)
            try:
                comp.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(comp.proc.pid, signal.SIGKILL)
                comp.proc.wait()

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def child_env(settings: Settings) -> dict[str, str]:
    """The settings a child needs, as SPENDSTREAM_* variables (the children read nothing else)."""
    s = settings
    env = {
        "SPENDSTREAM_ENV": s.env,
        "SPENDSTREAM_KAFKA__BOOTSTRAP_SERVERS": s.kafka_bootstrap,
        "SPENDSTREAM_KAFKA__PROFILE": "embedded" if s.kafka.embedded else s.kafka.profile,
        "SPENDSTREAM_KAFKA__PARTITIONS": str(s.kafka.partitions),
        "SPENDSTREAM_CLICKHOUSE__URL": s.clickhouse_url,
        "SPENDSTREAM_CLICKHOUSE__DATABASE": s.clickhouse.database,
        "SPENDSTREAM_GATEWAY__PORT": str(s.gateway.port),
        "SPENDSTREAM_QUERY_API__PORT": str(s.query_api.port),
        "SPENDSTREAM_BOOTSTRAP_ADMIN_KEY": s.bootstrap_admin_key.get_secret_value(),
        "SPENDSTREAM_BOOTSTRAP_TENANT": s.bootstrap_tenant,
    }
    if s.env == "dev":
        # local webhook receivers are normal in development
        env["SPENDSTREAM_PROCESSORS__WEBHOOK_ALLOW_PRIVATE"] = "true"
    return env


def _dev_admin_key(data_dir: Path, settings: Settings) -> str:
    """The configured bootstrap key, else one generated once and kept in .spendstream/."""
    configured = settings.bootstrap_admin_key.get_secret_value()
    if configured:
        return configured
    path = data_dir / "dev-admin-key"
    if path.exists():
        return path.read_text().strip()
    key = "ss_dev_" + secrets.token_urlsafe(24)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


def run_dev(demo: bool = False) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    base = Settings()
    data_dir = Path(base.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = _dev_admin_key(data_dir, base)
    settings = base.model_copy(
        update={
            "env": "dev",
            "bootstrap_admin_key": type(base.bootstrap_admin_key)(key),
            "kafka": base.kafka.model_copy(update={"profile": "embedded"} if base.kafka.embedded else {}),
        }
    )
    stack = Stack(settings, data_dir)
    stopping = threading.Event()

    def on_signal(signum, _frame):
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start()
    except (RuntimeError, TimeoutError) as exc:
        log.error("%s", exc)
        stack.stop()
        return 1
    dev_env = {
        "SPENDSTREAM_GATEWAY_URL": stack.gateway_url,
        "SPENDSTREAM_QUERY_URL": stack.query_url,
        "SPENDSTREAM_CLICKHOUSE_URL": settings.clickhouse_url,
        "SPENDSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "SPENDSTREAM_API_KEY": key,
    }
    (data_dir / "dev.env").write_text("".join(f"{k}={v}\n" for k, v in dev_env.items()))
    print(
        "\nSpendstream is up (Ctrl-C stops it).\n"
        f"  gateway     {stack.gateway_url}   (POST /v1/events, docs at /docs)\n"
        f"  query API   {stack.query_url}   (dashboard at /, docs at /docs)\n"
        f"  ClickHouse  {settings.clickhouse_url}\n"
        f"  Kafka       {settings.kafka_bootstrap}\n"
        f"  API key     {key}   (tenant {settings.bootstrap_tenant}; scopes ingest, read, admin)\n"
        f"  written to  {data_dir / 'dev.env'}\n"
        "Try:\n"
        f"  curl -H 'Authorization: Bearer {key}' -d '{{\"project\":\"demo\",\"provider\":\"openai\","
        f"\"model\":\"gpt-4o\",\"input_tokens\":1000,\"output_tokens\":200}}' {stack.gateway_url}/v1/events\n"
        f"  curl -H 'Authorization: Bearer {key}' {stack.query_url}/v1/analytics/overview\n",
        flush=True,
    )
    demo_proc = None
    if demo:
        demo_proc = subprocess.Popen(
            [sys.executable, "-m", "spendstream.cli", "simulate", "--rate", "50", "--no-progress"],
            env={**os.environ, **dev_env}, stdout=open(data_dir / "logs" / "simulate.log", "ab"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    stopping.wait()
    log.info("stopping")
    if demo_proc and demo_proc.poll() is None:
        os.killpg(demo_proc.pid, signal.SIGTERM)
    stack.stop()
    return 0
