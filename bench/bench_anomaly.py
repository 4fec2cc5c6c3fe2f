"""Anomaly detection: the stage's CPU per event and per scored minute, its memory under a hostile
tenant, and the detector's quality on a replayed synthetic fleet.

    .venv/bin/python -m bench.bench_anomaly cpu [--events 200000] [--agents 200] [--write-results]
    .venv/bin/python -m bench.bench_anomaly replay [--days 28] [--live-days 7] [--agents 200] [--write-results]

``cpu``: in this process, the stage's pure hot path (``stream_processors/anomaly/logic.add_record``
on priced envelopes of 50 events, as usage.priced carries them, then ``Detector.close`` of each
minute with a baseline for every scope): CPU seconds (``time.process_time``) per event and per
minute closed; then a hostile tenant sending 1,000,000 distinct agent names: the scopes tracked
and the peak memory of the detector (tracemalloc) stay bounded by ``max_series_per_tenant``.

``replay``: the detector and the baseline builder in simulated time, no broker: a fleet of
``--agents`` agents over ``--days`` days (the last ``--live-days`` scored live) with daily and weekly patterns (quiet nights and
weekends), noise, agents that start mid-way, and injected spikes of several kinds (volume, size,
price/mix) and sizes (3x..30x, 2..30 minutes). Minutes before each simulated hour are the
history its baselines are built from (the same ``baseline.build_baseline`` the stage runs over
``usage_minute``). Reports recall on spikes >= 5x for >= 5 minutes, false alerts per 100
agent-days and the detection delay in simulated minutes from spike start to the alert minute
(the stage adds ``anomaly.grace_s`` and notify's delivery; an open minute is scored early, so
this is an upper bound at minute granularity). The acceptance run of issue 18 (history in
ClickHouse, the last hours through the gateway, the delay to a webhook in wall time) is
``bench/bench_anomaly_e2e.py``.

``--write-results`` replaces the "Anomaly detector (cpu)" or "(replay)" section of bench/RESULTS.md
(not "Anomaly detection": a heading that prefix would match, and that one is bench_anomaly_e2e's).
"""

from __future__ import annotations

import argparse
import math
import random
import time
import tracemalloc
from dataclasses import dataclass

import orjson

from bench.stage_bench import machine, replace_section
from spendstream.anomaly import Detector, MinuteSample, Rule, build_baseline
from spendstream.anomaly.baseline import DAY_MS, HOUR_MS, MINUTE_MS, sample_days
from spendstream.settings import AnomalySettings
from spendstream.timeutil import TimestampParser, format_epoch_ms
from stream_processors.anomaly.logic import add_record

T0 = 1_780_000_000_000 - 1_780_000_000_000 % (7 * DAY_MS)


def envelope(tenant: str, project: str, events: list[dict]) -> bytes:
    return orjson.dumps({"v": 1, "tenant": tenant, "project": project, "received_at": events[0]["timestamp"],
                         "src": {"partition": 0, "offset": 0}, "events": events})  # fmt: skip


def priced_event(i: int, ts_ms: int, agent: str) -> dict:
    return {
        "event_id": f"e{i}", "timestamp": format_epoch_ms(ts_ms), "project": "p", "agent": agent,
        "provider": "openai", "model": "gpt-4o" if i % 4 else "gpt-4o-mini", "input_tokens": 1000 + i % 97,
        "output_tokens": 100, "status": "ok", "cost_nanos": 1_000_000 + i % 1000,
    }  # fmt: skip


def bench_cpu(events: int, agents: int) -> str:
    parse_ts = TimestampParser()
    minutes = 10
    per_minute = events // minutes
    records = []
    for m in range(minutes):
        batch = []
        for i in range(per_minute):
            batch.append(priced_event(m * per_minute + i, T0 + m * MINUTE_MS + i * 60_000 // per_minute,
                                      f"agent-{i % agents}"))  # fmt: skip
            if len(batch) == 50:
                records.append((m, envelope("t1", f"proj-{len(records) % 10}", batch)))
                batch = []
    baseline = build_baseline(
        {T0 - DAY_MS + i * MINUTE_MS: MinuteSample(10**9, 10, 10_000) for i in range(60)},
        [T0 - DAY_MS], "hour_of_day", score=6, ratio=3, min_samples=60,
    )  # fmt: skip
    detector = Detector()
    rule = Rule()
    add_cpu = close_cpu = 0.0
    closes = 0
    current = 0
    for m, value in records:
        if m != current:
            started = time.process_time()
            detector.close(T0 + current * MINUTE_MS, lambda *a: baseline, lambda t: rule)
            close_cpu += time.process_time() - started
            closes += 1
            current = m
        started = time.process_time()
        add_record(detector, value, parse_ts)
        add_cpu += time.process_time() - started
    scopes = detector.series_count
    # a hostile tenant: a million agent names in one minute
    hostile = Detector(max_series_per_tenant=2_000)
    tracemalloc.start()
    started = time.process_time()
    for i in range(1_000_000):
        hostile.add("evil", "p", f"agent-{i}", "m/m", T0, 1, 1, f"e{i}")
    hostile_cpu = time.process_time() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return (
        f"- {len(records) * 50:,} events in {len(records):,} envelopes of 50, {agents} agents, 10 projects: "
        f"add_record {add_cpu / (len(records) * 50) * 1e6:.1f} µs CPU per event\n"
        f"- Detector.close of one minute, {scopes} scopes with baselines: "
        f"{close_cpu / max(closes, 1) * 1e3:.2f} ms CPU ({close_cpu / max(closes, 1) / max(scopes, 1) * 1e6:.1f} µs "
        f"per scope)\n"
        f"- hostile tenant, 1,000,000 agent names: {hostile.series_count:,} scopes tracked, "
        f"{hostile_cpu / 1e6 * 1e6:.2f} µs CPU per event, peak {peak / 2**20:.1f} MiB (tracemalloc)\n"
    )


# ------------------------------------------------------------------ replay


@dataclass
class Spike:
    agent: int
    start: int  # minute index
    minutes: int
    factor: float
    kind: str  # volume | size | price_mix
    detected_at: int | None = None


def bench_replay(days: int, agents: int, live_days: int = 7, seed: int = 18) -> str:
    rng = random.Random(seed)
    minutes_total = days * 1440
    level = [rng.uniform(0.002, 0.05) * 1e9 for _ in range(agents)]  # USD per minute at the daily peak
    night = [rng.random() < 0.5 for _ in range(agents)]  # quiet nights
    start_day = [0 if rng.random() < 0.9 else rng.randint(1, days - 3) for _ in range(agents)]  # new agents
    spikes: list[Spike] = []
    live_from = (days - live_days) * 1440  # history first (hour-of-week baselines need 21 days)
    for a in range(agents):
        for _ in range(rng.randint(0, 2)):
            start = rng.randint(max(live_from, (start_day[a] + 2) * 1440), minutes_total - 60)
            spikes.append(Spike(a, start, rng.choice([2, 3, 5, 10, 30]), rng.choice([3, 5, 8, 15, 30]),
                                rng.choice(["volume", "size", "price_mix"])))  # fmt: skip

    def usual(a: int, m: int) -> float:
        if m < start_day[a] * 1440:
            return 0.0
        hour = (m // 60) % 24
        weekday = (m // 1440) % 7
        daily = 0.15 if night[a] and (hour < 7 or hour >= 22) else 0.6 + 0.4 * math.sin((hour - 6) / 24 * 2 * math.pi)
        weekly = 0.4 if weekday >= 5 else 1.0
        return level[a] * max(daily, 0.05) * weekly

    by_agent: dict[int, list[Spike]] = {}
    for s in spikes:
        by_agent.setdefault(s.agent, []).append(s)
    history: list[dict[int, MinuteSample]] = [{} for _ in range(agents)]
    detector = Detector()
    rule = Rule(min_excess_nanos=50_000_000)
    min_history = AnomalySettings().min_history_minutes
    baselines: dict[tuple[int, int], object] = {}
    alerts: list[tuple[int, int]] = []  # (agent, minute)
    started = time.process_time()
    for m in range(minutes_total):
        ts = T0 + m * MINUTE_MS
        for a in range(agents):
            base = usual(a, m)
            if base == 0:
                continue
            calls = max(0, round(rng.gauss(10, 2)))
            tpc, npt = 1000.0, base / 10 / 1000
            for s in by_agent.get(a, ()):
                if s.start <= m < s.start + s.minutes:
                    if s.kind == "volume":
                        calls = round(calls * s.factor)
                    elif s.kind == "size":
                        tpc *= s.factor
                    else:
                        npt *= s.factor
            cost = int(calls * tpc * npt * rng.uniform(0.8, 1.2))
            history[a][ts] = MinuteSample(cost, calls, int(calls * tpc), {"m": cost})
            if m >= live_from and calls:
                # one add per call would be exact; one per minute with the minute's totals is what matters here
                for c in range(min(calls, 5)):
                    share = calls // 5 if c < 4 else calls - 4 * (calls // 5)
                    if share:
                        detector.add(
                            "t", "p", f"a{a}", "m", ts + c, cost * share // calls, int(share * tpc), f"{a}:{m}:{c}"
                        )
        if m < live_from:
            continue
        hour = ts - ts % HOUR_MS

        def baseline_of(t: str, p: str, agent: str, ms: int, hour: int = hour) -> object:
            if not agent:
                return None
            a = int(agent[1:])
            key = (a, hour)
            if key not in baselines:
                first = T0 + start_day[a] * DAY_MS
                hours, seasonality = sample_days(hour, first, 28, 7)
                baselines[key] = build_baseline(history[a], hours, seasonality, score=rule.score, ratio=rule.ratio,
                                                min_samples=min_history)  # fmt: skip
            return baselines[key]

        for found in detector.close(ts, baseline_of, lambda t: rule):
            alerts.append((int(found.agent[1:]), (found.minute_ms - T0) // MINUTE_MS))
    cpu = time.process_time() - started
    big = [s for s in spikes if s.factor >= 5 and s.minutes >= 5]
    matched: set[int] = set()
    for s in spikes:
        for i, (a, at) in enumerate(alerts):
            if a == s.agent and s.start <= at < s.start + s.minutes + 15:
                s.detected_at = at if s.detected_at is None else min(s.detected_at, at)
                matched.add(i)
    false_alerts = len(alerts) - len(matched)
    live_agent_days = sum(max(0, days - max(days - live_days, start_day[a])) for a in range(agents))
    delays = sorted((s.detected_at - s.start + 1) for s in big if s.detected_at is not None)
    recall = sum(1 for s in big if s.detected_at is not None) / len(big) if big else float("nan")
    p95 = delays[min(len(delays) - 1, int(0.95 * len(delays)))] if delays else float("nan")
    return (
        f"- {agents} agents, {days} days ({days - live_days} of history, {live_days} live), {len(spikes)} spikes injected "
        f"({len(big)} of >= 5x for >= 5 min)\n"
        f"- recall on spikes >= 5x for >= 5 min: {recall:.1%}; false alerts: "
        f"{false_alerts / max(live_agent_days, 1) * 100:.2f} per 100 agent-days ({false_alerts} in {live_agent_days} "
        f"agent-days)\n"
        f"- detection delay (spike start -> alert minute, minute granularity): p95 {p95} min\n"
        f"- replay CPU {cpu:.0f} s\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("cpu", "replay"))
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--days", type=int, default=28)
    parser.add_argument("--live-days", type=int, default=7)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    if args.mode == "cpu":
        report = bench_cpu(args.events, args.agents)
        command = f"python -m bench.bench_anomaly cpu --events {args.events} --agents {args.agents}"
    else:
        report = bench_replay(args.days, args.agents, args.live_days)
        command = f"python -m bench.bench_anomaly replay --days {args.days} --live-days {args.live_days} --agents {args.agents}"
    print(report)
    if args.write_results:
        title = f"Anomaly detector ({args.mode})"
        # the section's text starts with its heading (replace_section replaces the heading too)
        replace_section(title, f"## {title}\n\n`{command}`, {machine()}\n\n{report}")


if __name__ == "__main__":
    main()
