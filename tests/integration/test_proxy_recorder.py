"""The proxy's recorder on the real broker: events are batched into few records, each published
once, and handed over without a task per event (``Publisher.submit``)."""

from __future__ import annotations

import asyncio

import pytest
from gateway_support import events_by_id, raw_position, read_raw, wait_until  # tests/integration is on sys.path

from ingest_gateway import logic
from ingest_gateway.metrics import GatewayMetrics
from ingest_gateway.proxy.metrics import ProxyMetrics
from ingest_gateway.proxy.recorder import BATCH_S, Recorder, Spool
from ingest_gateway.publisher import Publisher

pytestmark = pytest.mark.kafka


def _event(ctx: logic.RequestContext, project: str) -> logic.Event:
    obj = {"event_id": logic.uuid7(ctx.received_ms), "project": project, "provider": "openai", "model": "gpt-4o",
           "input_tokens": 10, "output_tokens": 2, "status": "ok"}  # fmt: skip
    validated = logic.validate_objects([obj], ctx)
    (event,) = validated.by_project[project]
    return event


async def test_events_are_batched_published_once_and_counted(make_settings, unique_name, tmp_path):
    settings = make_settings(with_clickhouse=False)
    tenants = [unique_name("rec"), unique_name("rec")]
    metrics = GatewayMetrics()
    publisher = Publisher(settings, metrics)
    await publisher.start()
    proxy_metrics = ProxyMetrics(metrics.registry)
    recorder = Recorder(publisher, Spool(tmp_path / "spool", 2**20), proxy_metrics)
    await recorder.start()
    try:
        await wait_until(publisher.ready)
        since = await raw_position(settings)
        sent: dict[str, set[str]] = {t: set() for t in tenants}
        assert BATCH_S >= 0.1
        for i in range(40):  # calls ending at different moments, within about one batch window
            tenant = tenants[i % 2]
            ctx = logic.RequestContext.now()
            event = _event(ctx, "a" if i % 4 < 2 else "b")
            recorder.record(tenant, ctx.received_at_str, event)
            sent[tenant].add(event.event_id)
            assert recorder.pending == i + 1 if i < 10 else recorder.pending > 0  # queued, not yet sent
            if i % 10 == 9 and i < 39:
                await asyncio.sleep(0.02)
        await wait_until(lambda: _done(recorder))
        assert proxy_metrics.published._value.get() == 40
        assert publisher.in_flight == 0
        for tenant in tenants:
            records = await read_raw(settings, tenant, 20, since)
            assert set(events_by_id(records)) == sent[tenant]  # each event, once
            assert sum(len(envelope["events"]) for _, envelope in records) == 20
            # one record per project per batch window (one window, or two if this one straddles):
            # far fewer records than events
            assert len(records) <= 2 * 2, [len(envelope["events"]) for _, envelope in records]
        assert not list(recorder._spool.segments())
    finally:
        await recorder.close()
        await publisher.close()


async def _done(recorder: Recorder) -> bool:
    return recorder.pending == 0
