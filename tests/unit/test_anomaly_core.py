"""The anomaly core with synthetic spend: baselines (steady, seasonal, past spikes trimmed), the
alert rule (20x runaway, slow ramp, one-minute blip), re-arming, stable ids and the explanation
(volume vs size vs price/mix)."""

from __future__ import annotations

import math
import random
from statistics import NormalDist

from spendstream.anomaly import Detector, MinuteSample, Rule, anomaly_alert_value, build_baseline
from spendstream.anomaly.baseline import (
    DAY_MS,
    HOUR_MS,
    MINUTE_MS,
    is_weekend,
    minute_spread,
    poisson_score,
    sample_days,
    seasonal_baseline,
)
from spendstream.anomaly.detector import anomaly_alert_id, remaining_share
from spendstream.anomaly.store import baselines_from_rows
from spendstream.settings import AnomalySettings

T0 = 1_780_000_000_000 - 1_780_000_000_000 % DAY_MS + 14 * HOUR_MS  # some day, 14:00 UTC
USUAL = 10_000_000  # $0.01 per minute
RULE = Rule(min_excess_nanos=50_000_000)  # $0.05


def history(per_minute, days: int = 7, hour: int = T0) -> dict[int, MinuteSample]:
    """minute start -> sample for the same hour on the ``days`` days before ``hour``."""
    out = {}
    for d in range(1, days + 1):
        for i in range(60):
            ms = hour - d * DAY_MS + i * MINUTE_MS
            cost, calls, tokens = per_minute(d, i)
            out[ms] = MinuteSample(cost, calls, tokens, {"openai/gpt-4o": cost})
    return out


def steady(d: int, i: int) -> tuple[int, int, int]:
    return USUAL, 10, 10_000


def baseline_for(per_minute=steady, days: int = 7):
    """The baseline of the same hour on the ``days`` days before T0 (every one a sample: which
    days ``sample_days`` picks is tested on its own)."""
    hours = [T0 - d * DAY_MS for d in range(1, days + 1)]
    return build_baseline(history(per_minute, days), hours, "hour_of_day", score=6, ratio=3, min_samples=60)


class Feed:
    """Drives a Detector minute by minute with one scope's spend."""

    def __init__(self, baseline, rule: Rule = RULE, rearm: int = 15):
        self.detector = Detector(rearm_minutes=rearm)
        self.baseline = baseline
        self.rule = rule
        self.alerts = []
        self.n = 0

    def minute(self, m: int, calls: int, tokens_per_call: int, nanos_per_call: int, model: str = "openai/gpt-4o"):
        ts = T0 + m * MINUTE_MS
        for c in range(calls):
            self.n += 1
            self.detector.add("t1", "p1", "a1", model, ts + c, nanos_per_call, tokens_per_call, f"ev{self.n}")
        found = self.detector.close(ts, lambda t, p, a, ms: self.baseline if a else None, lambda t: self.rule)
        self.alerts += found
        return found

    def usual(self, m: int):
        return self.minute(m, 10, 1000, USUAL // 10)


def test_steady_baseline_is_the_usual_minute() -> None:
    b = baseline_for()
    assert b.median == USUAL and b.mad == 0 and b.samples == 7 * 60
    assert b.seasonality == "hour_of_day"
    assert math.isclose(b.mean_calls, 10) and math.isclose(b.mean_tokens, 10_000)


def test_seasonal_baseline_uses_the_same_hour_of_week_with_long_history() -> None:
    hours, seasonality = sample_days(T0, T0 - 30 * DAY_MS, 28, 7)
    assert seasonality == "hour_of_week" and hours == [T0 - k * 7 * DAY_MS for k in range(1, 5)]
    hours, seasonality = sample_days(T0, T0 - 20 * DAY_MS, 28, 7)
    # under three weeks of history: the same hour of the last 7 days, of T0's type (a Thursday:
    # the 5 weekdays among them)
    assert seasonality == "hour_of_day" and hours == [T0 - k * DAY_MS for k in (1, 2, 3, 6, 7)]
    hours, seasonality = sample_days(T0, T0 - 3 * DAY_MS - HOUR_MS, 28, 7)
    assert seasonality == "hour_of_day" and len(hours) == 3  # only days the scope existed


def test_a_young_scope_compares_weekdays_with_weekdays_when_it_has_three() -> None:
    assert not is_weekend(T0) and is_weekend(T0 + 2 * DAY_MS) and is_weekend(T0 + 3 * DAY_MS)
    tuesday = T0 + 5 * DAY_MS
    # started on the Saturday before: Sat, Sun, Mon are too few weekdays: every day counts
    hours, _ = sample_days(tuesday, T0 + 2 * DAY_MS, 28, 7)
    assert hours == [tuesday - k * DAY_MS for k in (1, 2, 3)]
    # on Wednesday: Sat, Sun, Mon, Tue, still two weekdays only
    hours, _ = sample_days(tuesday + DAY_MS, T0 + 2 * DAY_MS, 28, 7)
    assert len(hours) == 4
    # three weekdays (Mon-Wed): the weekend is left out of Thursday's samples
    hours, _ = sample_days(tuesday + 2 * DAY_MS, T0 + 2 * DAY_MS, 28, 7)
    assert hours == [tuesday + 2 * DAY_MS - k * DAY_MS for k in (1, 2, 3)]
    # a weekend hour with only two weekend days in the last 7: every day counts
    saturday = T0 + 9 * DAY_MS
    hours, _ = sample_days(saturday, T0 - 10 * DAY_MS, 28, 7)
    assert len(hours) == 7
    # an office agent that started on a Saturday (weekends at a quarter of its weekday rate):
    # from its third weekday on its weekday usual is a weekday's, and a weekday is no anomaly
    level = {d: 0.25 if is_weekend(saturday + (5 - d) * DAY_MS) else 1.0 for d in range(1, 6)}
    hours, _ = sample_days(saturday + 5 * DAY_MS, saturday, 28, 7)
    samples = history(lambda d, i: (int(USUAL * level[d]), int(10 * level[d]), 1000), 5, saturday + 5 * DAY_MS)
    b = build_baseline(samples, hours, "hour_of_day", score=6, ratio=3, min_samples=180)
    assert b is not None and b.median == USUAL


def test_a_young_scope_s_first_weekdays_are_its_usual_when_its_weekend_was_quieter() -> None:
    """An office agent that started on a Saturday (weekends at a quarter of its weekday rate):
    on Tuesday its three days are Sat, Sun and Mon, too few weekdays for weekdays only; Monday
    alone is its usual (the three days' median is a weekend minute, and every weekday would read
    as 4x it)."""
    saturday = T0 + 2 * DAY_MS
    assert is_weekend(saturday) and not is_weekend(saturday + 3 * DAY_MS)

    def office(start: int):
        def minute(d: int, i: int) -> tuple[int, int, int]:
            level = 0.25 if is_weekend(start - d * DAY_MS) else 1.0
            return int(USUAL * level), int(10 * level), 1000

        return minute

    def baseline(hour: int, first_seen: int):
        return seasonal_baseline(history(office(hour), 7, hour), hour, first_seen, lookback_days=28, short_days=7,
                                 score=6, ratio=3, min_samples=180)  # fmt: skip

    tuesday = saturday + 3 * DAY_MS
    hours, _ = sample_days(tuesday, saturday, 28, 7)
    assert len(hours) == 3  # every day: only one weekday
    mixed = build_baseline(history(office(tuesday), 7, tuesday), hours, "hour_of_day", score=6, ratio=3,
                           min_samples=180)  # fmt: skip
    assert mixed is not None and mixed.median == USUAL // 4
    b = baseline(tuesday, saturday)
    assert b is not None and b.median == USUAL and b.samples == 60
    # a weekend hour of an agent that started on a Wednesday: its Saturday alone is lower than
    # every day's; every day is kept (a weekend against weekdays reads low, never a false alert)
    sunday = saturday + DAY_MS
    b = baseline(sunday, sunday - 4 * DAY_MS)
    assert b is not None and b.samples == 4 * 60 and b.median == USUAL
    # too young for any baseline: still none
    assert baseline(tuesday, tuesday - 2 * DAY_MS) is None


def test_past_spikes_do_not_widen_the_baseline() -> None:
    # a noisy agent with a 30x runaway for 20 minutes on one past day
    rng = random.Random(1)

    def noisy(d: int, i: int):
        cost = int(USUAL * rng.uniform(0.8, 1.2))
        return (cost * 30, 300, 300_000) if d == 2 and i < 20 else (cost, 10, 10_000)

    b = baseline_for(noisy)
    assert 0.8 * USUAL <= b.median <= 1.2 * USUAL
    assert b.mad < 0.15 * USUAL
    assert b.mean_cost < 1.25 * USUAL  # the runaway's minutes were trimmed


def test_steady_agent_never_alerts() -> None:
    feed = Feed(baseline_for())
    rng = random.Random(7)
    for m in range(180):
        feed.minute(m, rng.randint(8, 12), 1000, USUAL // 10)
    assert feed.alerts == []


def test_a_20x_runaway_alerts_once_at_once_with_a_volume_explanation() -> None:
    feed = Feed(baseline_for())
    for m in range(20):
        feed.usual(m)
    assert feed.minute(20, 200, 1000, USUAL // 10)  # 20x: extreme, alerts in its first minute
    for m in range(21, 40):
        feed.minute(m, 200, 1000, USUAL // 10)
    assert len(feed.alerts) == 1
    a = feed.alerts[0]
    assert a.alert_id == anomaly_alert_id("t1", "p1", "a1", T0 + 20 * MINUTE_MS)
    assert a.spike_type == "volume" and math.isclose(a.calls_ratio, 20) and math.isclose(a.size_ratio, 1)
    assert a.window_nanos == 9 * USUAL + 20 * USUAL and a.usual_window_nanos == 10 * USUAL
    assert math.isclose(a.ratio, 2.9) and math.isclose(a.episode_ratio, 20)
    assert a.models[0].model == "openai/gpt-4o" and math.isclose(a.models[0].share, 1)
    assert len(a.event_ids) == 3
    value = anomaly_alert_value(a, ("wh1",), T0 + 21 * MINUTE_MS)
    assert value["kind"] == "anomaly" and value["scope"] == {"project": "p1", "agent": "a1"}
    assert value["spent_usd"] == "0.290000000" and value["limit_usd"] == "0.100000000"
    assert value["anomaly"]["window_minutes"] == 10
    assert value["anomaly"]["spike_type"] == "volume" and value["anomaly"]["models"][0]["excess_usd"] == "0.190000000"
    assert value["channels"] == ["wh1"] and value["event_id"] == a.event_ids[0]


def test_a_runaway_right_after_the_stage_starts_is_told_over_the_minutes_it_has_seen() -> None:
    # the stage starts on a stream without the minutes before it: those are not spend-free minutes,
    # so the alert's window is the 2 minutes it has counted, not 10 with 8 of them at $0
    feed = Feed(baseline_for())
    feed.usual(0)
    assert feed.minute(1, 200, 1000, USUAL // 10)
    (a,) = feed.alerts
    assert a.window_start_ms == T0 and a.window_end_ms == T0 + 2 * MINUTE_MS
    assert a.window_nanos == 21 * USUAL and a.usual_window_nanos == 2 * USUAL and math.isclose(a.ratio, 10.5)
    value = anomaly_alert_value(a, (), T0 + 2 * MINUTE_MS)
    assert value["anomaly"]["window_minutes"] == 2
    assert value["spent_usd"] == "0.210000000" and value["limit_usd"] == "0.020000000"


def test_a_size_spike_is_told_from_a_volume_spike() -> None:
    feed = Feed(baseline_for())
    for m in range(20):
        feed.usual(m)
    feed.minute(20, 10, 8000, 8 * USUAL // 10)  # same calls, 8x tokens per call and cost
    assert feed.alerts == []  # 8x is not extreme: a second minute is needed
    feed.minute(21, 10, 8000, 8 * USUAL // 10)
    (a,) = feed.alerts
    assert a.spike_type == "size" and math.isclose(a.size_ratio, 8) and math.isclose(a.calls_ratio, 1)
    assert a.episode_start_ms == T0 + 20 * MINUTE_MS


def test_a_pricier_model_is_a_price_mix_shift() -> None:
    feed = Feed(baseline_for())
    for m in range(20):
        feed.usual(m)
    for m in (20, 21):
        feed.minute(m, 10, 1000, 6 * USUAL // 10, model="openai/o1")
    (a,) = feed.alerts
    assert a.spike_type == "price_mix" and math.isclose(a.price_ratio, 6)
    assert a.models[0].model == "openai/o1" and math.isclose(a.models[0].share, 1)


def test_a_one_minute_blip_does_not_alert() -> None:
    feed = Feed(baseline_for())
    for m in range(20):
        feed.usual(m)
    feed.minute(20, 150, 1000, USUAL // 10)  # 15x for one minute
    for m in range(21, 60):
        feed.usual(m)
    assert feed.alerts == []


def test_a_slow_ramp_alerts_once_when_it_is_far_above_the_usual() -> None:
    feed = Feed(baseline_for())
    for m in range(120):
        calls = 10 + m // 6  # +1 call every 6 minutes: 3x after 2 hours
        feed.minute(m, calls, 1000, USUAL // 10)
    assert feed.alerts == []  # 2.98x at most: below the ratio
    for m in range(120, 200):
        feed.minute(m, 10 + m // 6, 1000, USUAL // 10)
    assert len(feed.alerts) == 1


def test_the_episode_re_arms_after_normal_minutes() -> None:
    feed = Feed(baseline_for(), rearm=5)
    for m in range(10):
        feed.usual(m)
    for m in range(10, 15):
        feed.minute(m, 100, 1000, USUAL // 10)
    for m in range(15, 18):  # 3 normal minutes: still the same episode
        feed.usual(m)
    for m in range(18, 20):
        feed.minute(m, 100, 1000, USUAL // 10)
    assert len(feed.alerts) == 1
    # normal minutes: the 10x minutes leave the elevated windows (up to 10 minutes ending with a
    # minute), then 5 minutes without an elevated window: re-armed
    for m in range(20, 35):
        feed.usual(m)
    for m in range(35, 38):
        feed.minute(m, 100, 1000, USUAL // 10)
    assert len(feed.alerts) == 2
    assert feed.alerts[1].alert_id != feed.alerts[0].alert_id
    assert feed.alerts[1].episode_start_ms == T0 + 35 * MINUTE_MS


def test_the_same_events_replayed_give_the_same_alert_id() -> None:
    ids = []
    for _ in range(2):
        feed = Feed(baseline_for())
        for m in range(5, 20):
            feed.usual(m)
        for m in (20, 21):
            feed.minute(m, 60, 1000, USUAL // 10)
        ids.append([a.alert_id for a in feed.alerts])
    assert ids[0] == ids[1] and len(ids[0]) == 1


def test_a_restored_episode_is_not_alerted_again() -> None:
    feed = Feed(baseline_for())
    feed.detector.restore_episode("t1", "p1", "a1", T0, anomaly_alert_id("t1", "p1", "a1", T0))
    for m in range(0, 10):
        feed.minute(m, 200, 1000, USUAL // 10)
    assert feed.alerts == []


def test_below_the_dollar_floor_nothing_alerts() -> None:
    feed = Feed(baseline_for(), rule=Rule(min_excess_nanos=10**10))  # $10
    for m in range(30):
        feed.minute(m, 100, 1000, USUAL // 10)
    assert feed.alerts == []


def test_muted_and_disabled_scopes_do_not_alert() -> None:
    for rule in (Rule(min_excess_nanos=1, muted=("p1/a1",)), Rule(min_excess_nanos=1, enabled=False)):
        feed = Feed(baseline_for(), rule=rule)
        for m in range(10):
            feed.minute(m, 300, 1000, USUAL // 10)
        assert feed.alerts == []


def test_open_minute_alerts_early_and_closing_does_not_repeat() -> None:
    d = Detector()
    base = baseline_for()

    def baseline_of(t, p, a, ms):
        return base if a else None

    def rule_of(t):
        return RULE

    for m in range(5):
        for c in range(10):
            d.add("t1", "p1", "a1", "openai/gpt-4o", T0 + m * MINUTE_MS + c, USUAL // 10, 1000, f"e{m}.{c}")
        d.close(T0 + m * MINUTE_MS, baseline_of, rule_of)
    for m in (5, 6):
        for c in range(50):  # 5x
            d.add("t1", "p1", "a1", "openai/gpt-4o", T0 + m * MINUTE_MS + c, USUAL // 10, 1000, f"x{m}.{c}")
        if m == 5:
            assert d.peek(T0 + m * MINUTE_MS, baseline_of, rule_of) == []  # first elevated minute
            assert d.close(T0 + m * MINUTE_MS, baseline_of, rule_of) == []
    early = d.peek(T0 + 6 * MINUTE_MS, baseline_of, rule_of)
    assert len(early) == 1
    assert d.close(T0 + 6 * MINUTE_MS, baseline_of, rule_of) == []


def test_a_hostile_tenant_cannot_track_unbounded_scopes() -> None:
    d = Detector(max_series_per_tenant=50, max_series=120)
    for i in range(10_000):
        d.add("evil", "p", f"agent-{i}", "m/m", T0, 1, 1, f"e{i}")
    assert len(d.tenants["evil"]) <= 52
    for i in range(200):
        d.add(f"t{i}", "p", "a", "m/m", T0, 1, 1, f"f{i}")
    assert d.series_count <= 120 and d.dropped_series > 0
    # idle scopes are forgotten once they leave the window
    d.close(T0 + 30 * MINUTE_MS, lambda *a: None, lambda t: RULE)
    assert d.series_count == 0 and d.tenants == {}


def test_project_alert_is_left_out_when_an_agent_explains_it() -> None:
    d = Detector()
    base = baseline_for()

    def baseline_of(t, p, a, ms):
        return base

    for m in range(10):
        n = 200 if m >= 8 else 10
        for c in range(n):
            d.add("t1", "p1", "a1", "openai/gpt-4o", T0 + m * MINUTE_MS + c, USUAL // 10, 1000, f"e{m}.{c}")
    found = d.close(T0 + 9 * MINUTE_MS, baseline_of, lambda t: RULE)
    assert [(a.project, a.agent) for a in found] == [("p1", "a1")]


def test_a_new_agent_without_a_baseline_is_left_out_of_its_project() -> None:
    base = baseline_for()  # the project's and its old agent's: $0.01 a minute

    def baseline_of(t, p, a, ms):
        return None if a == "new" else base

    def run(new_agent: str) -> list:
        d = Detector()
        found = []
        for m in range(15):
            for c in range(10):
                d.add("t1", "p1", "old", "openai/gpt-4o", T0 + m * MINUTE_MS + c, USUAL // 10, 1000, f"o{m}.{c}")
            for c in range(50 if m >= 3 else 0):  # joins at 5x the project's usual spend
                d.add("t1", "p1", new_agent, "openai/gpt-4o", T0 + m * MINUTE_MS + c, USUAL // 10, 1000, f"n{m}.{c}")
            found += d.peek(T0 + m * MINUTE_MS, baseline_of, lambda t: RULE)
            found += d.close(T0 + m * MINUTE_MS, baseline_of, lambda t: RULE)
        return found

    # its spend is not in the project's history: no project alert (and no agent alert: no baseline)
    assert run("new") == []
    # the same spend from an agent with a baseline is the project's spike (and the agent's)
    assert {(a.project, a.agent) for a in run("other")} == {("p1", "other")}


def test_baselines_from_aggregate_rows_cover_projects_and_new_agents() -> None:
    from datetime import UTC, datetime

    def dt(ms):
        return datetime.fromtimestamp(ms / 1000, UTC)

    first = [("t1", "p1", "old", dt(T0 - 25 * DAY_MS)), ("t1", "p1", "new", dt(T0 - HOUR_MS))]
    rows = []
    for k in range(1, 4):  # hour of week: 3 past weeks
        for i in range(60):
            rows.append(
                ("t1", "p1", "old", "openai/gpt-4o", dt(T0 - k * 7 * DAY_MS + i * MINUTE_MS), USUAL, 10, 10_000)
            )
    first.append(("t1", "p1", "", dt(T0 - 25 * DAY_MS)))
    rows += [("t1", "p1", "", *r[3:]) for r in rows]  # the project's own rows
    out = baselines_from_rows(first, rows, T0, AnomalySettings(), {})
    assert out[("t1", "p1", "old")].median == USUAL
    assert out[("t1", "p1", "old")].seasonality == "hour_of_week"
    assert out[("t1", "p1", "")].median == USUAL
    assert ("t1", "p1", "new") not in out  # no history for this hour yet: not scored


def test_the_stage_reads_priced_envelopes_and_refuses_what_it_cannot_read() -> None:
    import orjson
    import pytest

    from spendstream.timeutil import TimestampParser, format_epoch_ms
    from stream_processors.anomaly.logic import add_record
    from stream_processors.runtime.retry import CONTENT_ERRORS

    d = Detector()
    event = {"event_id": "e1", "timestamp": format_epoch_ms(T0), "agent": "a1", "provider": "openai",
             "model": "gpt-4o", "input_tokens": 100, "output_tokens": 20, "cost_nanos": 5}  # fmt: skip
    envelope = {"v": 1, "tenant": "t1", "project": "p1", "events": [event]}
    assert add_record(d, orjson.dumps(envelope), TimestampParser()) == T0
    bucket = d.tenants["t1"][("p1", "a1")].minutes[T0]
    assert (bucket.cost, bucket.calls, bucket.tokens, bucket.models) == (5, 1, 120, {"openai/gpt-4o": 5})
    assert d.tenants["t1"][("p1", "")].minutes[T0].cost == 5
    bad = [
        b"not json",
        b"[]",
        orjson.dumps({**envelope, "events": [{**event, "cost_nanos": "5"}]}),
        orjson.dumps({**envelope, "events": [{**event, "timestamp": "yesterday"}]}),
        orjson.dumps({**envelope, "tenant": 3}),
        orjson.dumps({**envelope, "events": [{"event_id": "x"}]}),
    ]
    for value in bad:
        with pytest.raises(CONTENT_ERRORS):
            add_record(d, value, TimestampParser())
    # nothing of a refused record was counted
    assert d.tenants["t1"][("p1", "a1")].minutes[T0].calls == 1


# ---------------------------------------------------------------- low-rate agents, sub-minute timing
#
# An agent with a few Poisson calls a minute, each at its own millisecond, and the stage's timer:
# every second, close the minute that ended ``GRACE_MS`` ago and peek at the open one.

GRACE_MS = 5_000
CALL = 12_000_000  # $0.012 a call on average
LOW_RATE = 2.0  # calls a minute
LOW_RULE = Rule(min_excess_nanos=50_000_000)  # $0.05: about two usual minutes, so the floor is no shield


def poisson(rng: random.Random, lam: float) -> int:
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def call_cost(rng: random.Random) -> int:
    return int(CALL * rng.lognormvariate(-(0.35**2) / 2, 0.35))


def low_rate_baseline(seed: int = 99, rate: float = LOW_RATE):
    """7 days of the same hour of a Poisson agent at ``rate`` calls a minute."""
    rng = random.Random(seed)

    def minute(d: int, i: int) -> tuple[int, int, int]:
        n = poisson(rng, rate)
        cost = sum(call_cost(rng) for _ in range(n))
        return cost, n, n * 1000

    return baseline_for(minute)


class Clock:
    """Calls at their own times into a Detector, and the stage's 1-second timer."""

    def __init__(self, baseline, rule: Rule = LOW_RULE):
        self.detector = Detector()
        self.baseline = baseline
        self.rule = rule
        self.pending: list[tuple[int, ...]] = []  # (ms, cost) or (ms, cost, tokens)
        self.now = T0
        self.alerts: list[tuple[int, object]] = []  # (ms, anomaly)
        self.n = 0

    def calls(self, rng: random.Random, start_ms: int, end_ms: int, per_minute: float, x: float = 1.0) -> None:
        """Poisson calls; ``x``: each call x times bigger (tokens and cost: a size spike)."""
        for _ in range(poisson(rng, per_minute * (end_ms - start_ms) / MINUTE_MS)):
            self.pending.append((rng.randrange(start_ms, end_ms), int(call_cost(rng) * x), int(1000 * x)))

    def run_until(self, end_ms: int) -> None:
        self.pending.sort()
        i = 0
        while self.now < end_ms:
            self.now += 1000
            while i < len(self.pending) and self.pending[i][0] < self.now:
                ts, cost, *tokens = self.pending[i]
                self.n += 1
                self.detector.add("t1", "p1", "a1", "openai/gpt-4o", ts, cost, tokens[0] if tokens else 1000,
                                  f"ev{self.n}")  # fmt: skip
                i += 1
            due = minute_of(self.now - GRACE_MS) - MINUTE_MS

            def baseline_of(t, p, a, ms):
                return self.baseline if a else None

            found = []
            if due > self.detector.closed_ms:
                found += self.detector.close(due, baseline_of, lambda t: self.rule)
            found += self.detector.peek(self.now, baseline_of, lambda t: self.rule, grace_ms=GRACE_MS)  # as the stage
            self.alerts += [(self.now, a) for a in found]
        self.pending = self.pending[i:]


def minute_of(ms: int) -> int:
    return ms - ms % MINUTE_MS


def test_a_steady_low_rate_poisson_agent_never_alerts() -> None:
    clock = Clock(low_rate_baseline())
    rng = random.Random(5)
    hours = 24
    clock.calls(rng, T0, T0 + hours * HOUR_MS, LOW_RATE)  # the baseline's hour, all day long
    clock.run_until(T0 + hours * HOUR_MS)
    assert clock.alerts == []
    assert clock.detector.closed_ms >= T0 + (hours * 60 - 2) * MINUTE_MS


def test_one_minute_5x_blips_of_a_low_rate_agent_never_alert() -> None:
    clock = Clock(low_rate_baseline())
    rng = random.Random(6)
    for b in range(40):  # a blip every 30 minutes: 5x its calls for one whole minute, then normal
        start = T0 + b * 30 * MINUTE_MS
        clock.calls(rng, start, start + 10 * MINUTE_MS, LOW_RATE)
        clock.calls(rng, start + 10 * MINUTE_MS, start + 11 * MINUTE_MS, LOW_RATE * 5)
        clock.calls(rng, start + 11 * MINUTE_MS, start + 30 * MINUTE_MS, LOW_RATE)
    clock.run_until(T0 + 40 * 30 * MINUTE_MS)
    assert clock.alerts == []


def test_a_low_rate_5x_spike_alerts_within_about_two_minutes() -> None:
    delays = []
    for seed in range(20):
        clock = Clock(low_rate_baseline())
        rng = random.Random(seed)
        start = T0 + 30 * MINUTE_MS + rng.randrange(MINUTE_MS)  # at any second of a minute
        clock.calls(rng, T0, start, LOW_RATE)
        clock.calls(rng, start, start + 10 * MINUTE_MS, LOW_RATE * 5)
        clock.run_until(start + 10 * MINUTE_MS)
        assert len(clock.alerts) == 1, seed
        at, a = clock.alerts[0]
        assert a.agent == "a1" and a.spike_type == "volume" and a.alert_window_minutes >= 2
        delays.append((at - start) / 1000)
    delays.sort()
    # at 2 calls a minute a 5x spike needs a few calls more than its own noise (the exact Poisson
    # tail of the window's calls, and the day-to-day spread of its spend): about two minutes, at
    # worst a little over three
    assert delays[len(delays) // 2] <= 135, delays
    assert delays[-1] <= 200, delays


def test_poisson_score_is_the_normal_quantile_of_the_exact_tail() -> None:
    def upper_tail(count: int, mean: float) -> float:  # P(X >= count), summed from the pmf's logs
        return sum(math.exp(k * math.log(mean) - mean - math.lgamma(k + 1)) for k in range(count, count + 400))

    worst = 0.0
    for mean in (0.5, 1.8, 5.0, 20.0, 100.0):
        for count in range(math.floor(mean) + 2, int(mean * 6) + 12):
            exact = -NormalDist().inv_cdf(upper_tail(count, mean))  # the tail as a normal score
            if exact > 8:
                break
            worst = max(worst, abs(poisson_score(count, mean) - exact))
    assert worst <= 0.3
    # where the Gaussian (x - mean) / sqrt(mean) overstates: 8 calls where 1.8 are usual
    assert 3.2 <= poisson_score(8, 1.8) <= 3.5 < (8 - 1.8) / math.sqrt(1.8)
    assert poisson_score(3, 3) == 0 and poisson_score(1, 0) == math.inf


def test_the_spread_of_one_call_comes_from_the_minute_sums() -> None:
    b = low_rate_baseline(seed=8, rate=4.0)
    # log-normal calls of sigma 0.35 spread 0.36 x their mean; the upper side a little more
    assert 0.33 <= b.call_cv <= 0.5, b.call_cv
    assert abs(b.per_call - CALL) <= 0.1 * CALL
    assert b.call_unit > b.per_call * 1.1  # E[c^2] / E[c]: a Poisson count of these calls spreads more
    identical = baseline_for(lambda d, i: (10 * CALL, 10, 10_000))
    assert identical.call_cv == 0.0 and identical.call_unit == CALL * (1 + 0.1**2)  # the floor
    few = baseline_for(lambda d, i: (CALL, 1, 1000) if (d, i) in ((1, 0), (2, 0)) else (0, 0, 0))
    assert few is not None and few.call_cv == 1.0  # too few minutes with calls to know: wide


def test_a_low_rate_size_spike_alerts_on_the_cost_of_its_calls() -> None:
    """At 2 calls a minute, every call 5x bigger: the spend of a few minutes is within the count's
    noise for a while, the cost of its calls is not."""
    delays = []
    for seed in range(20):
        clock = Clock(low_rate_baseline())
        rng = random.Random(seed)
        start = T0 + 30 * MINUTE_MS + rng.randrange(MINUTE_MS)
        clock.calls(rng, T0, start, LOW_RATE)
        clock.calls(rng, start, start + 10 * MINUTE_MS, LOW_RATE, x=5)
        clock.run_until(start + 10 * MINUTE_MS)
        assert len(clock.alerts) == 1, seed
        at, a = clock.alerts[0]
        assert a.spike_type == "size" and 3 <= a.size_ratio <= 8, (seed, a.size_ratio)
        delays.append((at - start) / 1000)
    delays.sort()
    assert delays[len(delays) // 2] <= 125, delays


def test_one_minute_of_dear_calls_of_a_low_rate_agent_never_alerts() -> None:
    clock = Clock(low_rate_baseline(rate=1.0))
    rng = random.Random(6)
    for b in range(40):  # every 30 minutes, one minute whose calls are 5x bigger, then normal ones
        start = T0 + b * 30 * MINUTE_MS
        clock.calls(rng, start, start + 10 * MINUTE_MS, 1.0)
        clock.calls(rng, start + 10 * MINUTE_MS, start + 11 * MINUTE_MS, 1.0, x=5)
        clock.calls(rng, start + 11 * MINUTE_MS, start + 30 * MINUTE_MS, 1.0)
    clock.run_until(T0 + 40 * 30 * MINUTE_MS)
    assert clock.alerts == []


def test_a_spike_starting_at_second_50_alerts_soon() -> None:
    for seed in range(5):
        clock = Clock(baseline_for())  # 10 calls a minute, $0.01
        rng = random.Random(seed)
        start = T0 + 20 * MINUTE_MS + 50_000
        for m in range(20):
            clock.pending += [(T0 + m * MINUTE_MS + c * 6000, USUAL // 10) for c in range(10)]
        clock.pending += [(T0 + 20 * MINUTE_MS + c * 6000, USUAL // 10) for c in range(9)]
        clock.pending += [(rng.randrange(start, start + 5 * MINUTE_MS), USUAL // 10) for _ in range(250)]  # 5x
        clock.run_until(start + 5 * MINUTE_MS)
        ((at, a),) = clock.alerts
        # 10 s of the spike in its first minute, the next whole minute, then the window without
        # that minute must show 1.5x: about 25 s into the third (with the calls' own noise)
        assert (at - start) / 1000 <= 110, (seed, at - start)
        # the minute the spike started in has only 10 s of it: the episode starts with it or the next
        assert a.episode_start_ms in (T0 + 20 * MINUTE_MS, T0 + 21 * MINUTE_MS)


def test_an_alert_raised_early_has_the_same_id_when_the_events_are_replayed() -> None:
    """A crash after the alert was sent (by a peek) but before it was recorded: the restarted
    stage replays the window's events at once and closes the minutes; same alert id."""
    rng = random.Random(11)
    events = []
    start = T0 + 20 * MINUTE_MS + 37_000
    for m in range(21):
        events += [(T0 + m * MINUTE_MS + rng.randrange(MINUTE_MS), call_cost(rng)) for _ in range(poisson(rng, 10))]
    events = [e for e in events if e[0] < start]
    events += [(rng.randrange(start, start + 6 * MINUTE_MS), call_cost(rng)) for _ in range(60 * 6)]  # 6x
    base = baseline_for(lambda d, i: (10 * CALL, 10, 10_000))
    live = Clock(base)
    live.pending = list(events)
    live.run_until(start + 6 * MINUTE_MS)
    ((at, first),) = live.alerts
    for crash_after_s in (0, 30, 90, 200):  # the restart comes this long after the alert
        replay = Detector()

        def baseline_of(t, p, a, ms):
            return base if a else None

        up_to = at + crash_after_s * 1000
        for n, (ts, cost) in enumerate(sorted(events)):
            if ts < up_to:
                replay.add("t1", "p1", "a1", "openai/gpt-4o", ts, cost, 1000, f"r{n}")
        found = replay.close(minute_of(up_to - GRACE_MS) - MINUTE_MS, baseline_of, lambda t: LOW_RULE)
        found += replay.peek(up_to, baseline_of, lambda t: LOW_RULE, grace_ms=GRACE_MS)
        assert [a.alert_id for a in found] == [first.alert_id], crash_after_s
        assert found[0].episode_start_ms == first.episode_start_ms


def test_a_size_spike_raised_early_has_the_same_id_when_the_events_are_replayed() -> None:
    """The per-call path in an open minute counts its remaining seconds as ordinary calls, so what
    it raises early its close raises too: a replay after a crash yields the same alert id."""
    early = 0
    for seed in range(12):
        rng = random.Random(seed)
        base = low_rate_baseline(rate=3.0)
        start = T0 + 20 * MINUTE_MS + rng.randrange(MINUTE_MS)
        live = Clock(base)
        live.calls(rng, T0, start, 3.0)
        live.calls(rng, start, start + 8 * MINUTE_MS, 3.0, x=6)
        events = sorted(live.pending)
        live.run_until(start + 8 * MINUTE_MS)
        ((at, first),) = live.alerts
        assert first.spike_type == "size", seed
        early += at % MINUTE_MS != GRACE_MS  # minutes close at second 5 of the next: else a peek
        for crash_after_s in (0, 30, 62, 90):
            # the restarted stage: the window's events at once, then its timer and the new events
            replay = Clock(base)
            up_to = at + crash_after_s * 1000
            for n, (ts, cost, tokens) in enumerate(events):
                if ts < up_to:
                    replay.detector.add("t1", "p1", "a1", "openai/gpt-4o", ts, cost, tokens, f"r{n}")
            replay.pending = [e for e in events if e[0] >= up_to]
            replay.now = up_to - up_to % 1000
            replay.run_until(replay.now + 70_000)
            assert replay.alerts and replay.alerts[0][1].alert_id == first.alert_id, (seed, crash_after_s)
    assert early >= 6  # most were raised by a peek at the open minute


def test_a_sparse_agent_keeps_its_calls_in_the_baseline() -> None:
    # a call every three minutes: median and MAD 0; its calls are its usual spend, not anomalies
    rng = random.Random(3)

    def sparse(d: int, i: int) -> tuple[int, int, int]:
        n = poisson(rng, 0.3)
        return sum(call_cost(rng) for _ in range(n)), n, n * 1000

    b = baseline_for(sparse)
    assert b.median == 0 and b.mad == 0
    assert 0.2 < b.mean_calls < 0.4 and b.usual > 0.2 * CALL
    # the first estimate's spread, which decides what is trimmed: at least a Poisson count's
    assert minute_spread(b.mad, b.iqr, b.usual, b.per_call) >= math.sqrt(b.usual * CALL * 0.8)


def test_an_hour_busy_in_its_second_half_is_usual_there() -> None:
    # an office agent whose day starts at :30: nothing, then 20 calls a minute
    b = baseline_for(lambda d, i: (0, 0, 0) if i < 30 else (20 * USUAL // 10, 20, 20_000))
    assert b.usual_at(T0 + 45 * MINUTE_MS) == 2 * USUAL and b.usual_at(T0 + 5 * MINUTE_MS) == b.usual
    feed = Feed(b)
    for m in range(30, 90):  # the busy half, every day's level: no alert
        feed.minute(m, 20 if m % 60 >= 30 else 0, 1000, USUAL // 10)
    assert feed.alerts == []


def test_a_project_baseline_is_at_least_its_agents_usual() -> None:
    from spendstream.anomaly.baseline import with_members

    old = baseline_for()  # the project's samples, before a bigger agent joined it
    joined = baseline_for(lambda d, i: (3 * USUAL, 30, 30_000), days=4)
    project = with_members(old, [old, joined])
    assert project.usual == 4 * USUAL and project.median == old.median
    assert with_members(old, [old]).usual == old.usual


def test_the_remaining_share_counts_down_to_the_close() -> None:
    minute = T0 + 7 * MINUTE_MS
    assert remaining_share(minute, GRACE_MS) == 1.0  # a whole minute (and the grace) to come
    assert math.isclose(remaining_share(minute + 35_000, GRACE_MS), 0.5)  # 25 s + the 5 s grace
    assert math.isclose(remaining_share(minute + MINUTE_MS - 1, GRACE_MS), 5_001 / MINUTE_MS)
    assert math.isclose(remaining_share(minute + 30_000, 0), 0.5)
