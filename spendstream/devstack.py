"""`spendstream dev`: the whole stack on the embedded broker and ClickHouse, supervised.

``Stack`` is also what the e2e tests, the fault suite and the benchmarks start, so every one of
them runs the same processes the same way: each component is a child process (`spendstream
<command>`, or the Tansu binary itself for the embedded broker) with its settings passed as
SPENDSTREAM_* environment variables, a health check, and a restart when it dies (logged).

The embedded broker keeps everything in memory, so a broker (re)start begins a new log: usage.raw
offsets start again at 0. ClickHouse's ``ingest_progress`` still holds the highest usage.raw
offset stored per partition, and the sink drops every priced record at or below it as a replay
(spendstream/contracts.py) — it would silently drop new events until the new log caught up. So
whenever this stack (re)starts the embedded broker, it stops the stream stages, empties
``ingest_progress`` and starts the stages again (see ``Stack._forget_old_broker_log``). That is
only right because the old log is gone for good; against a real (durable) broker offsets never
restart and ``ingest_progress`` must never be touched, so nothing else does this.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from spendstream.ports import free_port, free_port_run
from spendstream.settings import Settings, settings_env
from stream_processors.stages import STAGES

log = logging.getLogger("spendstream.dev")

#: started first, in this order; everything else needs them
INFRASTRUCTURE = ("kafka", "clickhouse")
STOP_GRACE_S = 10.0

__all__ = ["Stack", "child_env", "local_settings", "run_dev"]


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
    paused: bool = False
    #: healthy and its after_start done; False from each (re)spawn until then
    ready: bool = False


class Stack:
    """Start, supervise, kill and restart the embedded stack's processes.

    ``history`` lists what happened to the processes as ``(unix time, component, what)``, what
    being started / killed / died / restarted / paused / resumed / broker-log-reset.
    """

    def __init__(self, settings: Settings, data_dir: Path, components: tuple[str, ...] | None = None):
        self.settings = settings
        self.data_dir = data_dir
        self.log_dir = data_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = child_env(settings)
        self._components = {c.name: c for c in self._plan() if components is None or c.name in components}
        self._stopping = threading.Event()
        #: held while a process is being replaced, so the supervisor never restarts it a second time
        self._replacing = threading.RLock()
        self._supervisor: threading.Thread | None = None
        self._broker_started = False
        self.history: list[tuple[float, str, str]] = []

    # -- the plan ---------------------------------------------------------------------------
    def _plan(self) -> list[Component]:
        s = self.settings
        cli = [sys.executable, "-m", "spendstream.cli"]
        comps: list[Component] = []
        if s.kafka.embedded:
            from spendstream.embedded.kafka import resolve_binary

            # The Tansu binary itself, not `spendstream embedded-kafka`: that wrapper starts Tansu in
            # a session of its own, so killing or pausing the wrapper would not reach the broker.
            port = s.kafka.embedded_port
            listener = f"tcp://127.0.0.1:{port}"
            comps.append(
                Component(
                    "kafka",
                    [
                        resolve_binary(s.kafka.broker_bin or None),
                        "broker",
                        "--listener-url",
                        listener,
                        "--advertised-listener-url",
                        listener,
                    ],
                    _tcp_ok(port),
                    after_start=self._on_broker_start,
                )
            )
        if s.clickhouse.embedded:
            port = s.clickhouse.embedded_port
            path = str(Path(s.clickhouse.data_path).resolve())
            comps.append(
                Component(
                    "clickhouse",
                    cli + ["embedded-clickhouse", "--port", str(port), "--path", path],
                    _http_ok(f"http://127.0.0.1:{port}/ping"),
                    after_start=self._migrate,
                )
            )
        comps.append(Component("gateway", cli + ["gateway"], _http_ok(self.gateway_url + "/readyz")))
        for i, stage in enumerate(STAGES):
            web_port = s.processors.web_port + i
            comps.append(
                Component(
                    stage,
                    cli + ["processors", "--stages", stage],
                    _http_ok(f"http://127.0.0.1:{web_port}/healthz"),
                    env={"SPENDSTREAM_PROCESSORS__WEB_PORT": str(web_port)},
                )
            )
        comps.append(Component("query-api", cli + ["query-api"], _http_ok(self.query_url + "/readyz")))
        if s.secret_keys.get_secret_value():
            # a scheduler without a port: healthy while its process runs (the supervisor restarts it)
            comps.append(Component("collectors", cli + ["collectors", "run"], lambda: True))
        return comps

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.gateway.port}"

    @property
    def query_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.query_api.port}"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._components)

    def _ensure_topics(self) -> None:
        from spendstream.topics import ensure_topics

        # Stack is blocking and may be driven from inside an event loop (async benchmarks and
        # tests), where asyncio.run() is refused: the coroutine gets a thread and a loop of its own.
        failure: list[BaseException] = []

        def create() -> None:
            try:
                asyncio.run(ensure_topics(self.settings))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                failure.append(exc)

        thread = threading.Thread(target=create, name="ensure-topics")
        thread.start()
        thread.join()
        if failure:
            raise failure[0]

    def _migrate(self) -> None:
        from spendstream.migrate import main as migrate_main

        if migrate_main(self.settings) != 0:
            raise RuntimeError("migrations failed; see the message above")

    # -- the memory-only broker -------------------------------------------------------------
    @property
    def _resets_ingest_progress(self) -> bool:
        """This stack runs the embedded broker and the sink that reads ``ingest_progress``."""
        return "kafka" in self._components and "sink" in self._components

    def _on_broker_start(self) -> None:
        self._ensure_topics()
        if self._broker_started and self._resets_ingest_progress:
            self._forget_old_broker_log()
        self._broker_started = True

    def _forget_old_broker_log(self) -> None:
        """After the embedded broker restarted: stages off, ingest_progress emptied, stages on.

        The stages go first: a running sink keeps the old watermarks in memory. Their consumer
        groups, changelogs and dedupe state went with the old broker too, so they start fresh."""
        stages = [c for c in self._components.values() if c.name in STAGES]
        for comp in stages:
            self._terminate(comp)
        self._reset_ingest_progress()
        for comp in stages:
            self._spawn(comp)
        for comp in stages:
            self._wait_healthy(comp, 90.0)

    def _reset_ingest_progress(self) -> None:
        from spendstream.clickhouse import get_client

        client = get_client(self.settings, database="default")
        try:
            client.command(f"TRUNCATE TABLE IF EXISTS `{self.settings.clickhouse.database}`.ingest_progress")
        finally:
            client.close()
        self._note("clickhouse", "broker-log-reset (ingest_progress truncated)")
        log.warning(
            "embedded broker started with a new, empty log: ingest_progress emptied so the sink "
            "does not take new offsets for replays"
        )

    # -- process control --------------------------------------------------------------------
    def _note(self, name: str, what: str) -> None:
        self.history.append((time.time(), name, what))

    def _spawn(self, comp: Component) -> None:
        if self._stopping.is_set():
            raise RuntimeError("the stack is stopping")
        comp.ready = False
        logf = open(self.log_dir / f"{comp.name}.log", "ab")
        comp.proc = subprocess.Popen(
            comp.argv,
            env={**os.environ, **self.env, **comp.env},
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        comp.paused = False
        logf.close()

    def _wait_healthy(self, comp: Component, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        needs = [c for c in self._components.values() if c.name in INFRASTRUCTURE and c is not comp]
        while not comp.healthy():
            if comp.proc is not None and comp.proc.poll() is not None:
                raise RuntimeError(
                    f"{comp.name} exited with {comp.proc.returncode}; see {self.log_dir / comp.name}.log"
                )
            if comp.name not in INFRASTRUCTURE and any(c.proc is not None and c.proc.poll() is not None for c in needs):
                # waiting would not help: the supervisor's next sweep restarts the broker/ClickHouse first
                raise RuntimeError(f"{comp.name}: a component it needs died meanwhile")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{comp.name} not healthy after {timeout:.0f}s; see {self.log_dir / comp.name}.log")
            time.sleep(0.1)
        if comp.after_start:
            comp.after_start()
        comp.ready = True

    def _terminate(self, comp: Component, grace: float = STOP_GRACE_S) -> None:
        if comp.proc is None or comp.proc.poll() is not None:
            return
        if comp.paused:
            os.killpg(comp.proc.pid, signal.SIGCONT)  # a stopped process never sees SIGTERM
        os.killpg(comp.proc.pid, signal.SIGTERM)
        try:
            comp.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(comp.proc.pid, signal.SIGKILL)
            comp.proc.wait()

    def start_component(self, name: str, timeout: float = 60.0) -> None:
        comp = self._components[name]
        self._spawn(comp)
        self._wait_healthy(comp, timeout)
        self._note(name, "started")

    def start(self, timeout: float = 90.0, supervise: bool = True) -> Stack:
        infrastructure = [n for n in INFRASTRUCTURE if n in self._components]
        for name in infrastructure:
            log.info("starting %s", name)
            self.start_component(name, timeout)
        if self._resets_ingest_progress:
            # a fresh memory-only log, but ClickHouse may hold a previous run's data
            self._reset_ingest_progress()
        for name in self._components:
            if name not in infrastructure:
                log.info("starting %s", name)
                self.start_component(name, timeout)
        if supervise:
            self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
            self._supervisor.start()
        return self

    def restart(self, name: str, env: dict[str, str] | None = None, timeout: float = 90.0) -> None:
        """Stop a component gracefully and start it again, with ``env`` added to its environment
        from now on (e.g. another setting for one process in a benchmark)."""
        comp = self._components[name]
        with self._replacing:
            comp.env.update(env or {})
            self._terminate(comp)
            self._spawn(comp)
            self._wait_healthy(comp, timeout)
        self._note(name, f"restarted on request{f' with {env}' if env else ''}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a component on purpose; the supervisor restarts it."""
        comp = self._components[name]
        if comp.proc is not None and comp.proc.poll() is None:
            self._note(name, f"killed ({signal.Signals(sig).name})")
            os.killpg(comp.proc.pid, sig)
            comp.proc.wait()

    def pause(self, name: str) -> None:
        """SIGSTOP a component: it keeps its memory (the embedded broker's log) but answers nothing.
        The supervisor leaves a paused process alone; :meth:`resume` continues it."""
        comp = self._components[name]
        assert comp.proc is not None and comp.proc.poll() is None, f"{name} is not running"
        os.killpg(comp.proc.pid, signal.SIGSTOP)
        comp.paused = True
        self._note(name, "paused (SIGSTOP)")

    def resume(self, name: str) -> None:
        comp = self._components[name]
        assert comp.proc is not None
        os.killpg(comp.proc.pid, signal.SIGCONT)
        comp.paused = False
        self._note(name, "resumed (SIGCONT)")

    def restarts(self, name: str) -> int:
        return self._components[name].restarts

    def pid(self, name: str) -> int | None:
        proc = self._components[name].proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def is_healthy(self, name: str) -> bool:
        return self._components[name].healthy()

    def wait_healthy(self, names: tuple[str, ...] | None = None, timeout: float = 120.0) -> None:
        """Block until every named component (default: all) runs and answers its health check."""
        deadline = time.monotonic() + timeout
        pending = list(names or self._components)
        while pending:
            comp = self._components[pending[0]]
            if comp.ready and comp.proc is not None and comp.proc.poll() is None and comp.healthy():
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"not healthy after {timeout:.0f}s: {pending}; logs in {self.log_dir}")
            time.sleep(0.1)

    def _supervise(self) -> None:
        while not self._stopping.wait(0.2):
            for comp in self._components.values():
                if self._stopping.is_set():
                    return
                with self._replacing:
                    if comp.proc is None or comp.proc.poll() is None:
                        continue
                    comp.restarts += 1
                    self._note(comp.name, f"died (exit {comp.proc.returncode})")
                    log.warning("%s died (exit %s); restarting (#%d)", comp.name, comp.proc.returncode, comp.restarts)
                    try:
                        self._spawn(comp)
                        self._wait_healthy(comp, 90.0)
                        self._note(comp.name, "restarted")
                    except Exception as exc:  # noqa: BLE001 - keep supervising; next sweep retries
                        log.error("restart of %s failed: %s", comp.name, exc)

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor:
            self._supervisor.join(timeout=STOP_GRACE_S)
        for comp in reversed(list(self._components.values())):
            self._terminate(comp)

    def __enter__(self) -> Stack:
        try:
            return self.start()
        except BaseException:
            # ``__exit__`` does not run when ``__enter__`` raises: stop what did start
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def child_env(settings: Settings) -> dict[str, str]:
    """Every setting as a SPENDSTREAM_* variable, embedded addresses resolved: the children read
    nothing else, so a child sees exactly ``settings``."""
    s = settings
    env = settings_env(s)
    env["SPENDSTREAM_KAFKA__BOOTSTRAP_SERVERS"] = s.kafka_bootstrap
    env["SPENDSTREAM_KAFKA__PROFILE"] = "embedded" if s.kafka.embedded else s.kafka.profile
    env["SPENDSTREAM_CLICKHOUSE__URL"] = s.clickhouse_url
    if s.env == "dev":
        # local webhook receivers are normal in development
        env["SPENDSTREAM_NOTIFY__WEBHOOK__ALLOW_PRIVATE"] = "true"
    return env


def local_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a stack of its own under ``data_dir`` (tests, benchmarks): embedded broker and
    ClickHouse, a free port for everything, ``env="dev"``. Nested sections are given as dicts
    and merged over these, e.g. ``local_settings(d, sink={"batch_seconds": 0.2})``."""
    base: dict[str, Any] = {
        "env": "dev",
        "data_dir": str(data_dir),
        "bootstrap_admin_key": "ss_local_" + secrets.token_urlsafe(24),
        "kafka": {"bootstrap_servers": "", "profile": "embedded", "embedded_port": free_port()},
        "clickhouse": {"url": "", "embedded_port": free_port(), "data_path": str(data_dir / "clickhouse")},
        "gateway": {"port": free_port()},
        "query_api": {"port": free_port()},
        "processors": {"web_port": free_port_run(len(STAGES))},
    }
    for section, value in overrides.items():
        base[section] = {**base[section], **value} if isinstance(value, dict) and section in base else value
    return Settings(**base)


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


def _dev_secret_keys(data_dir: Path, settings: Settings) -> str:
    """The configured SPENDSTREAM_SECRET_KEYS, else a keyring generated once and kept in
    .spendstream/ (0600), so stored provider and admin keys and the collectors work in development."""
    configured = settings.secret_keys.get_secret_value()
    if configured:
        return configured
    path = data_dir / "dev-secret-keys"
    if path.exists():
        return path.read_text().strip()
    from spendstream.secrets import generate_key

    spec = generate_key("dev1")
    path.write_text(spec + "\n")
    path.chmod(0o600)
    return spec


def run_dev(demo: bool = False) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # health polls would drown the console
    base = Settings()
    data_dir = Path(base.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = _dev_admin_key(data_dir, base)
    settings = base.model_copy(
        update={
            "env": "dev",
            "bootstrap_admin_key": type(base.bootstrap_admin_key)(key),
            "secret_keys": type(base.secret_keys)(_dev_secret_keys(data_dir, base)),
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
        f'  curl -H \'Authorization: Bearer {key}\' -H \'Content-Type: application/json\' -d \'{{"project":"demo","provider":"openai",'
        f'"model":"gpt-4o","input_tokens":1000,"output_tokens":200}}\' {stack.gateway_url}/v1/events\n'
        f"  curl -H 'Authorization: Bearer {key}' {stack.query_url}/v1/analytics/overview\n",
        flush=True,
    )
    demo_proc = None
    if demo:
        demo_proc = subprocess.Popen(
            [sys.executable, "-m", "spendstream.cli", "simulate", "--rate", "50", "--no-progress"],
            env={**os.environ, **dev_env},
            stdout=open(data_dir / "logs" / "simulate.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stopping.wait()
    log.info("stopping")
    if demo_proc and demo_proc.poll() is None:
        os.killpg(demo_proc.pid, signal.SIGTERM)
    stack.stop()
    return 0
