"""Spend anomaly detection over 1-minute buckets. Pure: no Kafka, HTTP or ClickHouse.

Scopes: every (tenant, project, agent) and every (tenant, project) (agent ""). Each priced
event adds its cost, one call and its tokens to its minute in both scopes
(:meth:`Detector.add`). When a minute has ended (plus a grace for late events) the caller
closes it (:meth:`Detector.close`) and every tracked scope of every tenant is scored on it
against its baseline for that hour (``baseline.py``); the minute still open is scored early
(:meth:`Detector.peek`) for the scopes with new spend in it.

Scoring a minute m looks at the windows of k = 1..``WINDOW_MINUTES`` minutes ending with m
(spend S, usual k x the usual minute U):

- a window is *elevated* when S >= ``rule.ratio`` x U and one of two scores reaches
  ``rule.score``: the *spend score*, the smaller of the level score ``(S - U) / (sqrt(k) x
  level spread)`` (:meth:`Baseline.level_spread`: 1.4826 x MAD, the day-to-day movement; a
  k-minute sum spreads sqrt(k) x one minute) and the *count score*, the normal quantile of the
  exact Poisson tail of S / u calls of the unit u (:attr:`Baseline.call_unit`) where U / u are
  usual (:func:`poisson_score`), judged at ``POISSON_SHARE`` of ``rule.score``; or the
  *per-call score* (:func:`per_call_score`: the window's cost per call against the usual, a
  size or price/mix spike, which an agent with a call or two a minute shows in a few calls,
  long before their spend stands out of the count's noise);
- an alert fires when some window is elevated, it is not a blip, and its excess S - U is at
  least ``rule.min_excess_nanos``. *Not a blip* (the issue's "two consecutive windows"): k >= 2
  and the window without its largest minute is still clearly above its usual: at least
  ``GUARD_RATIO`` x and a score of ``GUARD_SCORE_SHARE`` x ``rule.score`` over its k - 1
  minutes on the same score (for the per-call score: its calls still cost ``GUARD_RATIO`` x
  the usual), so a one-minute spike followed by normal minutes never alerts whatever its
  size below ``rule.extreme_ratio``; a single minute (k = 1) at ``rule.extreme_ratio`` x the
  usual alerts alone (the *extreme* path);
- the open minute's spend only grows and every spend condition above only grows with it (the
  window without its largest minute included), so an early peek that alerts is an alert its
  close would also raise: the peek only makes it sooner. The per-call score can fall with more
  ordinary calls, so a peek counts the open minute's calls so far plus twice the usual number
  of calls of the time left before its close (and one) at the usual cost, the most those
  seconds bring but for a rare Poisson draw;
- one alert per *episode*: after it, the scope alerts again only once ``rearm_minutes`` closed
  minutes in a row had no elevated window ending with them. The alert id is a hash of the scope
  and the episode's start: the first of the run of closed minutes right before the alert minute
  whose spend is at least ``EPISODE_RATIO`` x the usual (the alert minute itself when the minute
  before it is not). It depends only on minutes closed before the alert minute, which a replay of
  the same events after a crash rebuilds, and the alert minute is the same in the replay (the
  minutes before it were scored the same, and an alert in an open minute is an alert at its
  close), so the replay yields the same id.

A scope without a baseline (less history than ``min_history_minutes`` for the hour: a new agent)
is not scored itself, and its spend is left out of its project's score until it has one: the
project's history has none of it, so a new agent's ordinary work would read as the project's
spike (its project's alert still shows the project's whole spend).

Memory is bounded: a scope keeps the minutes of one window; a scope without spend for a window
and without an open episode is forgotten; a tenant tracks at most ``max_series_per_tenant``
scopes (more agents fold into one ``(other)`` scope, which has no baseline) and the detector at
most ``max_series`` (more are not tracked; counted in ``dropped_series``). Per minute bucket at
most ``MAX_MODELS`` models and ``MAX_EXAMPLES`` example event ids are kept.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from spendstream.anomaly.baseline import HOUR_MS, MIN_CALL_CV, MINUTE_MS, Baseline, poisson_score

WINDOW_MINUTES = 10
#: the blip guard: a window without its largest minute must still be this multiple of its usual
#: (1.5: at 2x, spikes whose first minute had few of their calls waited for a third; the score below
#: keeps a normal minute out) ...
GUARD_RATIO = 1.5
#: ... and reach this share of the rule's score (over its k - 1 minutes)
GUARD_SCORE_SHARE = 0.5
#: the count score (an exact Poisson tail's normal quantile) is judged at this share of the
#: rule's score: 5 at the default 6, a one-in-3.5-million window; the level score's threshold
#: keeps room for day-to-day moves its MAD does not see, which an exact tail does not need
POISSON_SHARE = 5 / 6
#: an episode starts at the first of the minutes in a row, up to the alert, at this multiple of the usual
EPISODE_RATIO = 2.0
MAX_MODELS = 8
MAX_EXAMPLES = 3
OTHER = "(other)"
#: the spike kinds: more calls, bigger calls (tokens per call), or dearer tokens (a pricier model)
SPIKE_TYPES = ("volume", "size", "price_mix")


@dataclass(frozen=True, slots=True)
class Rule:
    """A tenant's alert rule (its ``anomaly_settings``, or the defaults)."""

    enabled: bool = True
    score: float = 6.0
    ratio: float = 3.0
    min_excess_nanos: int = 1_000_000_000
    extreme_ratio: float = 20.0
    channels: tuple[str, ...] = ()
    #: "project" or "project/agent" scopes that never alert
    muted: tuple[str, ...] = ()

    def mutes(self, project: str, agent: str) -> bool:
        return project in self.muted or (bool(agent) and f"{project}/{agent}" in self.muted)


@dataclass(slots=True)
class Bucket:
    """One scope's one minute."""

    cost: int = 0
    calls: int = 0
    tokens: int = 0
    models: dict[str, int] = field(default_factory=dict)
    model_calls: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, model: str, cost: int, tokens: int, event_id: str) -> None:
        self.cost += cost
        self.calls += 1
        self.tokens += tokens
        if model not in self.models and len(self.models) >= MAX_MODELS:
            model = OTHER
        self.models[model] = self.models.get(model, 0) + cost
        self.model_calls[model] = self.model_calls.get(model, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(event_id)


@dataclass(slots=True)
class Episode:
    start_ms: int
    alert_id: str
    quiet: int = 0


@dataclass(slots=True)
class Series:
    minutes: dict[int, Bucket] = field(default_factory=dict)
    #: newest minute scored (ms); the next close scores every minute after it
    scored_ms: int = 0
    episode: Episode | None = None
    last_spend_ms: int = 0


@dataclass(frozen=True, slots=True)
class Hit:
    """The window that alerts: its length (minutes), spend, robust score, and whether it is the
    one-minute extreme path."""

    minutes: int
    spent: int
    score: float
    extreme: bool


@dataclass(frozen=True, slots=True)
class ModelExcess:
    model: str
    spent_nanos: int
    usual_nanos: int
    excess_nanos: int
    share: float


@dataclass(frozen=True, slots=True)
class Anomaly:
    """An alert's figures. Window = the 10 minutes ending with ``minute_ms``; the episode's
    minutes (``episode_start_ms`` .. ``minute_ms``) explain it."""

    tenant: str
    project: str
    agent: str
    alert_id: str
    episode_start_ms: int
    minute_ms: int
    window_start_ms: int
    window_end_ms: int
    window_nanos: int
    usual_window_nanos: int
    ratio: float
    score: float
    excess_nanos: int
    minute_nanos: int
    usual_minute_nanos: int
    #: the episode's minutes: their spend, its usual, and the ratio (the runaway's rate, undiluted)
    episode_nanos: int
    usual_episode_nanos: int
    episode_ratio: float
    spike_type: str
    calls: int
    usual_calls: float
    calls_ratio: float | None
    tokens_per_call: float | None
    usual_tokens_per_call: float | None
    size_ratio: float | None
    nanos_per_token: float | None
    usual_nanos_per_token: float | None
    price_ratio: float | None
    models: tuple[ModelExcess, ...]
    event_ids: tuple[str, ...]
    seasonality: str
    baseline_samples: int
    extreme: bool
    #: the elevated window that alerted: its length in minutes (ending with ``minute_ms``) and spend
    alert_window_minutes: int = 1
    alert_window_nanos: int = 0


def anomaly_alert_id(tenant: str, project: str, agent: str, episode_start_ms: int) -> str:
    """Stable per (scope, episode's start minute)."""
    digest = hashlib.sha256(f"anomaly|{tenant}|{project}|{agent}|{episode_start_ms}".encode()).hexdigest()
    return f"an_{digest[:32]}"


def minute_of(ts_ms: int) -> int:
    return ts_ms - ts_ms % MINUTE_MS


BaselineOf = Callable[[str, str, str, int], Baseline | None]
RuleOf = Callable[[str], Rule]


class Detector:
    def __init__(self, *, rearm_minutes: int = 15, max_series_per_tenant: int = 2_000, max_series: int = 200_000):
        self.rearm_minutes = rearm_minutes
        self.max_series_per_tenant = max_series_per_tenant
        self.max_series = max_series
        #: tenant -> (project, agent) -> series
        self.tenants: dict[str, dict[tuple[str, str], Series]] = {}
        self.series_count = 0
        self.dropped_series = 0
        #: newest minute closed
        self.closed_ms = 0
        #: oldest minute counted (0: none yet): an alert's window starts no earlier, so a stage started
        #: on a stream without the minutes before it does not show them as spend-free minutes
        self.since_ms = 0
        #: minute not closed yet -> the scopes with new spend in it since the last peek (what
        #: ``peek`` scores)
        self._dirty: dict[int, set[tuple[str, tuple[str, str]]]] = {}

    # ----------------------------------------------------------------- input

    def add(self, tenant: str, project: str, agent: str, model: str, ts_ms: int, cost_nanos: int, tokens: int,
            event_id: str) -> bool:  # fmt: skip
        """Count one priced event; False when it is too old to matter (before the open window)."""
        minute = minute_of(ts_ms)
        if self.closed_ms and minute <= self.closed_ms - WINDOW_MINUTES * MINUTE_MS:
            return False
        scopes = self.tenants.get(tenant)
        if scopes is None:
            scopes = self.tenants[tenant] = {}
        for key in ((project, ""), (project, agent)):
            series = self._series(scopes, key, minute)
            if series is None:
                continue
            bucket = series.minutes.get(minute)
            if bucket is None:
                bucket = series.minutes[minute] = Bucket()
            if minute > self.closed_ms:
                dirty = self._dirty.get(minute)
                if dirty is None:
                    dirty = self._dirty[minute] = set()
                dirty.add((tenant, key))
            bucket.add(model, cost_nanos, tokens, event_id)
            if minute > series.last_spend_ms:
                series.last_spend_ms = minute
        if not self.since_ms or minute < self.since_ms:
            self.since_ms = minute
        return True

    def _series(self, scopes: dict[tuple[str, str], Series], key: tuple[str, str], minute: int) -> Series | None:
        series = scopes.get(key)
        if series is not None:
            return series
        if len(scopes) >= self.max_series_per_tenant:
            key = (OTHER, OTHER if key[1] else "")
            series = scopes.get(key)
            if series is not None:
                return series
        if self.series_count >= self.max_series:
            self.dropped_series += 1
            return None
        self.series_count += 1
        # scored from its first minute on (minutes before it had no spend of its own to score)
        series = scopes[key] = Series(scored_ms=minute - MINUTE_MS)
        return series

    def restore_episode(self, tenant: str, project: str, agent: str, start_ms: int, alert_id: str) -> None:
        """An episode alerted before a restart: open until ``rearm_minutes`` normal minutes pass."""
        scopes = self.tenants.setdefault(tenant, {})
        series = scopes.get((project, agent))
        if series is None:
            if self.series_count >= self.max_series:
                return
            self.series_count += 1
            series = scopes[(project, agent)] = Series(scored_ms=minute_of(start_ms))
        if series.episode is None:
            series.episode = Episode(start_ms, alert_id)

    # ----------------------------------------------------------------- scoring

    def close(self, minute_ms: int, baseline_of: BaselineOf, rule_of: RuleOf) -> list[Anomaly]:
        """Score every tracked scope on every minute up to ``minute_ms`` (inclusive) not scored yet."""
        minute_ms = minute_of(minute_ms)
        if minute_ms <= self.closed_ms:
            return []
        self.closed_ms = minute_ms
        for done in [m for m in self._dirty if m <= minute_ms]:
            del self._dirty[done]
        out: list[Anomaly] = []
        horizon = minute_ms - WINDOW_MINUTES * MINUTE_MS
        for tenant, scopes in list(self.tenants.items()):
            rule = rule_of(tenant)
            members = _members(scopes)
            for key, series in list(scopes.items()):
                m = max(series.scored_ms + MINUTE_MS, horizon + MINUTE_MS)
                while m <= minute_ms:
                    found = self._score(tenant, key, series, m, baseline_of, rule, members=members)
                    if found is not None:
                        out.append(found)
                    m += MINUTE_MS
                series.scored_ms = max(series.scored_ms, minute_ms)
                for old in [k for k in series.minutes if k <= horizon]:
                    del series.minutes[old]
                if series.episode is None and series.last_spend_ms <= horizon:
                    del scopes[key]
                    self.series_count -= 1
            if not scopes:
                del self.tenants[tenant]
        return self._one_per_incident(out)

    def peek(self, now_ms: int, baseline_of: BaselineOf, rule_of: RuleOf, *, grace_ms: int = 0) -> list[Anomaly]:
        """Score the open minute (the one holding ``now_ms``, after the newest closed) early, for the
        scopes with new spend in it since the last peek: spend only grows while a minute is open
        and the rule only grows with it, so a window that alerts now alerts at the minute's close
        too; its closing then finds the episode open and alerts nothing twice. A minute that does
        not alert yet is left for :meth:`close` (or the next peek, after more spend). The per-call
        path projects the ordinary calls of the time left before the minute closes, ``grace_ms``
        after its end (:func:`remaining_share`)."""
        minute_ms = minute_of(now_ms)
        remaining = remaining_share(now_ms, grace_ms)
        if minute_ms != self.closed_ms + MINUTE_MS:
            return []
        out: list[Anomaly] = []
        members_of: dict[str, dict[str, list[tuple[str, Series]]]] = {}
        for tenant, key in self._dirty.pop(minute_ms, ()):
            series = self.tenants.get(tenant, {}).get(key)
            if series is None or series.episode is not None or series.scored_ms >= minute_ms:
                continue
            members = None
            if not key[1]:
                members = members_of.get(tenant)
                if members is None:
                    members = members_of[tenant] = _members(self.tenants[tenant])
            found = self._score(tenant, key, series, minute_ms, baseline_of, rule_of(tenant), open_minute=True,
                                members=members, remaining=remaining)  # fmt: skip
            if found is not None:
                out.append(found)
        return self._one_per_incident(out)

    def _one_per_incident(self, found: list[Anomaly]) -> list[Anomaly]:
        """A project's alert is left out when one of its agents has an open episode: the agent's
        alert names the incident more precisely (the project's episode still opens)."""
        out = []
        for a in found:
            if not a.agent:
                scopes = self.tenants.get(a.tenant, {})
                if any(k[0] == a.project and k[1] and s.episode is not None for k, s in scopes.items()):
                    continue
            out.append(a)
        return out

    def _score(self, tenant: str, key: tuple[str, str], series: Series, m: int, baseline_of: BaselineOf,
               rule: Rule, *, open_minute: bool = False, members: dict[str, list[tuple[str, Series]]] | None = None,
               remaining: float = 1.0) -> Anomaly | None:  # fmt: skip
        project, agent = key
        baseline = baseline_of(tenant, project, agent, m) if OTHER not in key else None
        if baseline is None:
            if not open_minute and series.episode is not None:
                self._quiet(series)
            return None
        earlier = None
        if m - (WINDOW_MINUTES - 1) * MINUTE_MS < m - m % HOUR_MS:
            earlier = baseline_of(tenant, project, agent, m - m % HOUR_MS - MINUTE_MS)
        unexplained = None
        if not agent and members:
            unexplained = unexplained_spend(tenant, project, members.get(project, ()), m, baseline_of)
        elevated, hit = windows(series.minutes, m, baseline, earlier, rule, unexplained, open_minute, remaining)
        if series.episode is not None:
            if not open_minute:
                if elevated:
                    series.episode.quiet = 0
                else:
                    self._quiet(series)
            return None
        if hit is None or not rule.enabled or rule.mutes(project, agent):
            return None
        start = episode_start(series.minutes, m, baseline.usual)
        series.episode = Episode(start, anomaly_alert_id(tenant, project, agent, start))
        return explain(tenant, project, agent, series, m, baseline, start, hit, since_ms=self.since_ms)

    def _quiet(self, series: Series) -> None:
        assert series.episode is not None
        series.episode.quiet += 1
        if series.episode.quiet >= self.rearm_minutes:
            series.episode = None


def _members(scopes: dict[tuple[str, str], Series]) -> dict[str, list[tuple[str, Series]]]:
    """project -> its agents' (name, series)."""
    out: dict[str, list[tuple[str, Series]]] = {}
    for (project, agent), series in scopes.items():
        if agent:
            out.setdefault(project, []).append((agent, series))
    return out


def unexplained_spend(tenant: str, project: str, members: Iterable[tuple[str, Series]], m: int,
                      baseline_of: BaselineOf) -> dict[int, int] | None:  # fmt: skip
    """The spend a minute of the window ending with ``m`` of the project's agents that have no
    baseline for that minute's hour (new agents): left out of the project's score (module
    docstring); None when there is none."""
    out: dict[int, int] = {}
    first = m - (WINDOW_MINUTES - 1) * MINUTE_MS
    for agent, series in members:
        if agent == OTHER:
            continue
        known: dict[int, bool] = {}
        for minute, bucket in series.minutes.items():
            if minute < first or minute > m or not bucket.cost:
                continue
            hour = minute - minute % HOUR_MS
            if hour not in known:
                known[hour] = baseline_of(tenant, project, agent, minute) is not None
            if not known[hour]:
                out[minute] = out.get(minute, 0) + bucket.cost
    return out or None


def windows(minutes: dict[int, Bucket], m: int, baseline: Baseline, earlier: Baseline | None,
            rule: Rule, unexplained: dict[int, int] | None = None,
            open_minute: bool = False, remaining: float = 1.0) -> tuple[bool, Hit | None]:  # fmt: skip
    """Score the windows of 1..``WINDOW_MINUTES`` minutes ending with minute ``m`` (module
    docstring): whether any is elevated, and the alerting window with the highest score, if any.
    Each minute counts against its own hour's baseline: ``earlier`` is the previous hour's (a
    window does not reach into it without one). ``unexplained``: spend a minute to leave out
    (a project's new agents, :func:`unexplained_spend`). ``open_minute``: ``m`` is still open:
    the per-call path, whose mean can fall with more calls, counts it with its calls so far plus
    twice the usual number of calls of the ``remaining`` share of a minute still to come before
    its close (and one) at the usual cost, the most those seconds bring but for a rare Poisson
    draw, so that what alerts early is what its close would raise."""
    hour_start = m - m % HOUR_MS
    spent = top = calls = top_calls = 0
    expected = variance = count = usual_count = usual_calls = 0.0
    call_cv = MIN_CALL_CV
    #: the open minute's projected remaining calls (count, cost) and whether it is the largest minute
    phantom_calls = phantom_cost = 0.0
    top_open = False
    elevated = False
    best: Hit | None = None
    for k in range(1, WINDOW_MINUTES + 1):
        minute = m - (k - 1) * MINUTE_MS
        b = baseline if minute >= hour_start else earlier
        if b is None:
            break
        bucket = minutes.get(minute)
        cost = bucket.cost if bucket is not None else 0
        n = bucket.calls if bucket is not None else 0
        if unexplained and minute in unexplained:
            cost -= unexplained[minute]
            n = -1  # the minute's own calls are not known: no per-call path for this window
        spent += cost
        calls = -1 if n < 0 or calls < 0 else calls + n
        if cost > top:
            top, top_calls, top_open = cost, n, k == 1 and open_minute
        usual = b.usual_at(minute)
        expected += usual
        variance += b.level_spread(usual) ** 2
        unit = b.call_unit
        if unit > 0:
            count += cost / unit
            usual_count += usual / unit
        per_call = b.per_call
        usual_calls += usual / per_call if per_call > 0 else 0.0
        if k == 1 and open_minute and per_call > 0:
            phantom_calls = 2.0 * usual * remaining / per_call + 1.0
            phantom_cost = phantom_calls * per_call
        call_cv = max(call_cv, b.call_cv)
        if spent <= expected or spent < rule.ratio * expected:
            continue
        score = min((spent - expected) / math.sqrt(variance), poisson_score(count, usual_count) / POISSON_SHARE)
        usual_per_call = expected / usual_calls if usual_calls > 0 else 0.0
        call_score = 0.0
        if calls > 0 and usual_per_call > 0:
            call_score = per_call_score(spent + phantom_cost, calls + phantom_calls, usual_per_call, call_cv)
        if score < rule.score and call_score < rule.score:
            continue
        elevated = True
        if spent - expected < rule.min_excess_nanos:
            continue
        if k == 1:
            if score >= rule.score and spent >= rule.extreme_ratio * usual and (best is None or best.score < score):
                best = Hit(1, spent, score, True)
            continue
        # the blip guard: without its largest minute the window is still clearly above its usual
        # (its k - 1 other minutes: the usual and spread of a mean minute of the window), by its
        # spend or by the cost of its calls
        rest = spent - top
        rest_expected = expected * (k - 1) / k
        if rest <= rest_expected or rest < GUARD_RATIO * rest_expected:
            continue
        guard = GUARD_SCORE_SHARE * rule.score
        if score >= rule.score and (best is None or best.score < score):
            rest_score = min(
                (rest - rest_expected) / math.sqrt(variance * (k - 1) / k),
                poisson_score(count * rest / spent, usual_count * (k - 1) / k) / POISSON_SHARE,
            )
            if rest_score >= guard:
                best = Hit(k, spent, score, False)
                continue
        # the per-call path's guard: the other minutes' calls still cost GUARD_RATIO x the usual
        rest_calls = calls - top_calls
        rest_calls_all = rest_calls + (0.0 if top_open else phantom_calls)
        rest_all = rest + (0.0 if top_open else phantom_cost)
        if (
            call_score >= rule.score
            and (best is None or best.score < call_score)
            and rest_calls > 0
            and rest_all >= GUARD_RATIO * usual_per_call * rest_calls_all
            and per_call_score(rest_all, rest_calls_all, usual_per_call, call_cv) >= guard
        ):
            best = Hit(k, spent, call_score, False)
    return elevated, best


def remaining_share(now_ms: int, grace_ms: int) -> float:
    """The share of a minute still to come before the open minute (the one holding ``now_ms``)
    closes, ``grace_ms`` after its end: its calls not counted yet (at most a minute's)."""
    end = minute_of(now_ms) + MINUTE_MS + grace_ms
    return min(1.0, max(0.0, (end - now_ms) / MINUTE_MS))


def per_call_score(spent: float, calls: float, per_call: float, cv: float) -> float:
    """The normal score of ``calls`` calls costing ``spent`` when one usually costs ``per_call``
    with a spread of ``cv`` x that: bigger or dearer calls (a size or price/mix spike), which a
    scope with a call or two a minute shows in its first few calls, long before their count or
    spend stands out from its Poisson noise. Costs are positive and skewed (a few big calls),
    so the mean of ``calls`` calls is taken as log-normal with the mean's spread,
    sigma^2 = ln(1 + cv^2 / calls): a Gaussian on the mean would make two calls at 2.5x the usual
    a score of 6 at a cv of 0.36, which such calls reach a few times a day."""
    if per_call <= 0 or calls <= 0 or spent <= 0:
        return 0.0
    sigma = math.sqrt(math.log1p(cv * cv / calls))
    return (math.log(spent / (calls * per_call)) + sigma * sigma / 2) / sigma


def episode_start(minutes: dict[int, Bucket], m: int, usual: float) -> int:
    """The first of the closed minutes in a row right before ``m`` at ``EPISODE_RATIO`` x the
    usual or more (``m`` when the minute before it is not): depends only on closed minutes."""
    start = m
    for k in range(1, WINDOW_MINUTES):
        bucket = minutes.get(m - k * MINUTE_MS)
        if bucket is None or bucket.cost <= 0 or bucket.cost < EPISODE_RATIO * usual:
            break
        start = m - k * MINUTE_MS
    return start


def explain(tenant: str, project: str, agent: str, series: Series, m: int, baseline: Baseline, start: int,
            hit: Hit, *, since_ms: int = 0) -> Anomaly:  # fmt: skip
    """The alert's figures: the 10-minute window against the usual, the window that alerted, and
    the episode's minutes decomposed into calls x tokens per call x cost per token, and by model.
    The window starts no earlier than ``since_ms``, the oldest minute the detector has counted:
    minutes before it were not seen, not spend-free."""
    score, extreme = hit.score, hit.extreme
    window_start = max(m - (WINDOW_MINUTES - 1) * MINUTE_MS, since_ms)
    window = sum(b.cost for k, b in series.minutes.items() if window_start <= k <= m)
    usual = baseline.usual
    episode = [b for k, b in sorted(series.minutes.items()) if start <= k <= m]
    n = (m - start) // MINUTE_MS + 1
    cost = sum(b.cost for b in episode)
    calls = sum(b.calls for b in episode)
    tokens = sum(b.tokens for b in episode)
    usual_calls = baseline.mean_calls * n

    def ratio(now: float | None, then: float | None) -> float | None:
        return None if now is None or not then else now / then

    tpc = tokens / calls if calls else None
    usual_tpc = baseline.mean_tokens / baseline.mean_calls if baseline.mean_calls else None
    npt = cost / tokens if tokens else None
    usual_npt = baseline.mean_cost / baseline.mean_tokens if baseline.mean_tokens else None
    calls_ratio = ratio(calls, usual_calls)
    size_ratio = ratio(tpc, usual_tpc)
    price_ratio = ratio(npt, usual_npt)
    factors = {"volume": calls_ratio, "size": size_ratio, "price_mix": price_ratio}
    known = {k: abs(math.log(v)) for k, v in factors.items() if v}
    spike_type = max(known, key=known.__getitem__) if known else "volume"
    spent_by_model: dict[str, int] = {}
    for b in episode:
        for model, c in b.models.items():
            spent_by_model[model] = spent_by_model.get(model, 0) + c
    excesses = {
        model: max(0, spent - round(baseline.model_cost.get(model, 0.0) * n)) for model, spent in spent_by_model.items()
    }
    total_excess = sum(excesses.values())
    models = tuple(
        sorted(
            (
                ModelExcess(
                    model,
                    spent_by_model[model],
                    round(baseline.model_cost.get(model, 0.0) * n),
                    excess,
                    excess / total_excess if total_excess else 0.0,
                )  # fmt: skip
                for model, excess in excesses.items()
            ),
            key=lambda e: (-e.excess_nanos, e.model),
        )[:5]
    )
    examples: list[str] = []
    for b in reversed(episode):
        examples.extend(e for e in b.examples if len(examples) < MAX_EXAMPLES)
    usual_window = round(usual * ((m - window_start) // MINUTE_MS + 1))
    last = series.minutes.get(m)
    return Anomaly(
        tenant=tenant, project=project, agent=agent, alert_id=anomaly_alert_id(tenant, project, agent, start),
        episode_start_ms=start, minute_ms=m, window_start_ms=window_start, window_end_ms=m + MINUTE_MS,
        window_nanos=window, usual_window_nanos=usual_window,
        ratio=window / usual_window if usual_window else math.inf, score=score,
        excess_nanos=window - usual_window, minute_nanos=last.cost if last else 0, usual_minute_nanos=round(usual),
        episode_nanos=cost, usual_episode_nanos=round(usual * n),
        episode_ratio=cost / (usual * n) if usual else math.inf,
        spike_type=spike_type, calls=calls, usual_calls=usual_calls, calls_ratio=calls_ratio,
        tokens_per_call=tpc, usual_tokens_per_call=usual_tpc, size_ratio=size_ratio,
        nanos_per_token=npt, usual_nanos_per_token=usual_npt, price_ratio=price_ratio,
        models=models, event_ids=tuple(examples), seasonality=baseline.seasonality,
        baseline_samples=baseline.samples, extreme=extreme, alert_window_minutes=hit.minutes,
        alert_window_nanos=hit.spent,
    )  # fmt: skip
