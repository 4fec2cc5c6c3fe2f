"""The anomaly stage's pure transforms: a usage.priced record into the detector."""

from __future__ import annotations

from collections.abc import Callable

import orjson

from spendstream.anomaly import Detector


class NotPriced(ValueError):
    """A usage.priced record that is not a priced envelope."""


def add_record(detector: Detector, value: bytes, parse_ts: Callable[[str], int]) -> int | None:
    """Count the events of one priced envelope; returns the newest event time (ms) of the
    record, or None when it holds none the detector kept. Raises on content it cannot read
    (a dead letter): the record is checked whole before any event is counted."""
    envelope = orjson.loads(value)
    if not isinstance(envelope, dict) or not isinstance(envelope.get("events"), list):
        raise NotPriced("not a priced envelope")
    tenant, project = envelope["tenant"], envelope["project"]
    if not isinstance(tenant, str) or not isinstance(project, str):
        raise NotPriced("tenant and project must be strings")
    rows = []
    for ev in envelope["events"]:
        cost = ev.get("cost_nanos", 0)
        tokens = ev.get("input_tokens", 0) + ev.get("output_tokens", 0)
        if type(cost) is not int or type(tokens) is not int:
            raise NotPriced(f"event {ev.get('event_id')!r}: cost_nanos and token counts must be integers")
        rows.append((
            str(ev.get("agent") or "default"), f"{ev['provider']}/{ev['model']}", parse_ts(ev["timestamp"]), cost,
            tokens, str(ev["event_id"]),
        ))  # fmt: skip
    newest = None
    for agent, model, ts, cost, tokens, event_id in rows:
        if detector.add(tenant, project, agent, model, ts, cost, tokens, event_id):
            newest = ts if newest is None else max(newest, ts)
    return newest
