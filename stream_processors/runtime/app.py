"""Faust app factory: one app (= consumer group, changelogs, web server) per stream stage.

The app id is ``spendstream-<stage>``, so each stage has its own consumer group and table
changelogs (``spendstream-<stage>-<table>-changelog``) and a stage process can be killed, scaled
or restarted alone. Broker settings, including the embedded-broker workarounds, come only from
``spendstream.kafka.faust_settings``.

Every app is a ``StageApp``: Faust with the consumer whose delivery guarantee the stages rely on
(in order from the committed offset, none left out; see ``stream_processors.runtime.consumer``).

Every app serves on ``settings.processors.web_port``:
- ``GET /healthz``: 200 once the worker got its first partition assignment and finished table
  recovery, 503 while (re)balancing or recovering; the body says which.
- ``GET /metrics``: Prometheus text (the stage's counters plus process metrics).
"""

from __future__ import annotations

from pathlib import Path

import faust
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from spendstream.kafka import apply_faust_embedded_profile, faust_settings
from spendstream.settings import Settings
from stream_processors.runtime.consumer import StageApp


def create_app(settings: Settings, stage: str) -> faust.App:
    apply_faust_embedded_profile(settings)
    datadir = Path(settings.data_dir) / "faust" / stage
    # Faust creates only the last level itself
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = StageApp(
        f"spendstream-{stage}",
        **faust_settings(settings),
        datadir=str(datadir),
        autodiscover=False,
        web_enabled=True,
        web_port=settings.processors.web_port,
        # Faust's built-in pages would publish table contents (dedupe keys) and routing details.
        web_tables_enabled=False,
        web_router_enabled=False,
        web_graph_enabled=False,
        web_stats_enabled=False,
    )
    _add_health_pages(app)
    return app


def _add_health_pages(app: faust.App) -> None:
    assigned_once = False

    @app.on_partitions_assigned.connect
    async def _on_assigned(sender: faust.App, assigned: set, **kwargs) -> None:
        nonlocal assigned_once
        assigned_once = True

    @app.page("/healthz")
    async def healthz(web, request):
        # An assignment may legitimately be empty (more workers than partitions): what matters
        # is that the group handed us one and our tables are caught up.
        state = {
            "assigned": assigned_once,
            "rebalancing": bool(app.rebalancing),
            "recovering": bool(app.tables.recovery.in_recovery),
            "assignment": sorted(f"{tp.topic}:{tp.partition}" for tp in app.consumer.assignment()),
        }
        ready = state["assigned"] and not state["rebalancing"] and not state["recovering"]
        return web.json({"ready": ready, **state}, status=200 if ready else 503)

    @app.page("/metrics")
    async def metrics(web, request):
        return web.bytes(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST.split(";")[0])
