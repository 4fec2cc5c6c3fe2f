// The Spendstream dashboard: reads the query API as a person logged in (e-mail and password), or
// with an API key entered once, and redraws every few seconds. Budgets and alerts appear when the
// deployment serves those endpoints.
//
// Tokens never go to localStorage: the access token lives in this page's memory only; the refresh
// token (and an API key) in sessionStorage, which this tab alone sees and which ends with it. A page
// reload trades the refresh token for a new access token (the refresh token rotates each time).
"use strict";

const KEY_STORAGE = "spendstream.apiKey";
const REFRESH_STORAGE = "spendstream.refreshToken";
const ORG_STORAGE = "spendstream.org";
const RANGES = { "1h": 3600e3, "24h": 86400e3, "7d": 7 * 86400e3, "30d": 30 * 86400e3, "90d": 90 * 86400e3 };
const { columnChart, barList, burnBar, bandChart, formatUsd } = window.SpendCharts;

const $ = (sel) => document.querySelector(sel);
const form = $("#filters");
let timer = null;
let generation = 0;

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

// -- a person's session ----------------------------------------------------------------------
const session = { access: "", me: null, org: sessionStorage.getItem(ORG_STORAGE) || "", timer: null };
let refreshing = null;

function credentialHeaders() {
  if (session.access) {
    const headers = { Authorization: `Bearer ${session.access}` };
    if (session.org) headers["X-Org-Id"] = session.org;
    return headers;
  }
  return apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {};
}

async function call(method, path, { params, json, auth = true } = {}) {
  const url = new URL(path, window.location.origin);
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
  }
  const send = () => fetch(url, {
    method,
    headers: { ...(auth ? credentialHeaders() : {}), ...(json !== undefined ? { "Content-Type": "application/json" } : {}) },
    body: json !== undefined ? JSON.stringify(json) : undefined,
  });
  let response = await send();
  // an expired access token: trade the refresh token once, then try again
  if (response.status === 401 && auth && session.access && (await refreshTokens())) response = await send();
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

const api = (path, params) => call("GET", path, { params });

function adoptTokens(tokens) {
  session.access = tokens.access_token;
  sessionStorage.setItem(REFRESH_STORAGE, tokens.refresh_token);
  clearTimeout(session.timer);
  // renew a little before expiry, so a refresh in flight never races a request's 401 retry
  session.timer = setTimeout(refreshTokens, Math.max(5, tokens.expires_in * 0.8) * 1000);
}

// One refresh at a time: presenting a rotated refresh token twice would end the session.
function refreshTokens() {
  if (!refreshing) {
    refreshing = (async () => {
      const token = sessionStorage.getItem(REFRESH_STORAGE);
      if (!token) return false;
      try {
        adoptTokens(await call("POST", "/auth/refresh", { json: { refresh_token: token }, auth: false }));
        return true;
      } catch (err) {
        endSession();
        setStatus("Your session ended; log in again.", true);
        return false;
      }
    })().finally(() => { refreshing = null; });
  }
  return refreshing;
}

function endSession() {
  session.access = "";
  session.me = null;
  clearTimeout(session.timer);
  sessionStorage.removeItem(REFRESH_STORAGE);
  showSession();
}

async function loadMe() {
  session.me = await call("GET", "/auth/me");
  const orgs = session.me.orgs;
  if (!orgs.some((o) => o.id === session.org)) session.org = orgs.length ? orgs[0].id : "";
  sessionStorage.setItem(ORG_STORAGE, session.org);
  showSession();
}

function currentRole() {
  const org = session.me?.orgs.find((o) => o.id === session.org);
  return org ? org.role : "";
}

function showSession() {
  const me = session.me;
  $("#login-form").hidden = Boolean(me);
  if (me) $("#accept-form").hidden = true;
  $("#user-bar").hidden = !me;
  if (!me) {
    $("#members-panel").hidden = true;
    return;
  }
  $("#user-name").textContent = me.user.name || me.user.email;
  const select = $("#org-switch");
  select.replaceChildren(...me.orgs.map((o) => new Option(o.name || o.id, o.id)));
  select.value = session.org;
  $("#org-role").textContent = currentRole();
  showMembers();
}

// -- members (owners and admins) ---------------------------------------------------------------
async function showMembers() {
  const panel = $("#members-panel");
  const role = currentRole();
  if (!session.me || !["owner", "admin"].includes(role)) {
    panel.hidden = true;
    return;
  }
  const org = session.org;
  const listing = await call("GET", `/v1/orgs/${encodeURIComponent(org)}/members`);
  if (org !== session.org) return;
  $("#members-org").textContent = org;
  $("#members tbody").replaceChildren(...listing.members.map((m) => {
    const tr = document.createElement("tr");
    tr.dataset.user = m.user_id;
    for (const value of [m.name, m.email]) {
      const td = document.createElement("td");
      td.textContent = value;
      tr.append(td);
    }
    const roleCell = document.createElement("td");
    const select = document.createElement("select");
    select.className = "member-role";
    select.append(...["owner", "admin", "member", "viewer"].map((r) => new Option(r, r)));
    select.value = m.role;
    select.addEventListener("change", () => memberAction("PUT", m.user_id, { role: select.value }));
    roleCell.append(select);
    const removeCell = document.createElement("td");
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "member-remove";
    remove.textContent = "Remove";
    remove.addEventListener("click", () => memberAction("DELETE", m.user_id));
    removeCell.append(remove);
    tr.append(roleCell, removeCell);
    return tr;
  }));
  panel.hidden = false;
}

async function memberAction(method, userId, json) {
  try {
    await call(method, `/v1/orgs/${encodeURIComponent(session.org)}/members/${encodeURIComponent(userId)}`, { json });
    setStatus(method === "DELETE" ? "Member removed." : "Role changed.");
  } catch (err) {
    setStatus(`Error: ${err.message}`, true);
  }
  await showMembers();
}

// A table row of text cells: each cell is [value, class?, title?].
function tableRow(cells) {
  const tr = document.createElement("tr");
  for (const [value, cls, title] of cells) {
    const td = document.createElement("td");
    td.textContent = value;
    if (cls) td.className = cls;
    if (title) td.title = title;
    tr.append(td);
  }
  return tr;
}

function setStatus(text, isError) {
  const el = $("#status");
  el.textContent = text;
  el.classList.toggle("error", Boolean(isError));
}

// -- filters ---------------------------------------------------------------------------------
// The range sent is whole buckets: "from" is the start of the first bucket and "to" the end of the
// current one (the next whole minute or hour, or for day/week/month buckets today's local date,
// which the API reads as "through the end of that day" in the time zone). The chart's first bucket
// is then complete, and the API answers from the coarsest aggregate alone: the 90 days of a day
// chart are read from the daily table only, not from daily + hourly + minute tables (each table read
// costs ClickHouse a fixed ~10 ms of CPU), and never from raw events for ragged sub-minute ends.
function currentFilters() {
  const data = new FormData(form);
  const range = data.get("range");
  const tz = data.get("tz") || "UTC";
  const custom = range === "custom" && data.get("from") && data.get("to");
  const to = custom ? new Date(data.get("to")) : new Date();
  const from = custom ? new Date(data.get("from")) : new Date(to.getTime() - (RANGES[range] || RANGES["7d"]));
  const span = to - from;
  let granularity = data.get("granularity");
  if (granularity === "auto") {
    granularity = span <= 3 * 3600e3 ? "minute" : span <= 8 * 86400e3 ? "hour" : "day";
  }
  return {
    params: {
      from: bucketStart(from, granularity, tz), to: custom ? to.toISOString() : bucketEnd(to, granularity, tz), tz,
      project: data.get("project"), agent: data.get("agent"), model: data.get("model"),
    },
    granularity,
  };
}

function bucketEnd(instant, granularity, tz) {
  if (granularity === "minute") return new Date(Math.ceil(instant / 60e3) * 60e3).toISOString();
  if (granularity === "hour") return new Date(Math.ceil(instant / 3600e3) * 3600e3).toISOString();
  return localDate(instant, tz);
}

function bucketStart(instant, granularity, tz) {
  if (granularity === "minute") return new Date(Math.floor(instant / 60e3) * 60e3).toISOString();
  if (granularity === "hour") return new Date(Math.floor(instant / 3600e3) * 3600e3).toISOString();
  return localDate(instant, tz);
}

function localDate(instant, tz) {
  // en-CA formats dates as YYYY-MM-DD
  return new Intl.DateTimeFormat("en-CA", { timeZone: tz, year: "numeric", month: "2-digit", day: "2-digit" }).format(instant);
}

function fillOptions(select, keys) {
  const chosen = select.value;
  const values = [...new Set([...keys, chosen].filter((k) => k !== ""))].sort();
  const options = [new Option("all", "")].concat(values.map((v) => new Option(v, v)));
  select.replaceChildren(...options);
  select.value = chosen;
}

// -- panels ----------------------------------------------------------------------------------
function showCards(o) {
  const set = (field, text, title) => {
    const el = document.querySelector(`[data-field="${field}"]`);
    el.textContent = text;
    el.title = title || "";
  };
  set("cost", formatUsd(o.cost_usd_number), `${o.cost_usd} USD`);
  set("calls", o.calls.toLocaleString());
  set("avg", formatUsd(o.avg_cost_per_call_usd_number), `${o.avg_cost_per_call_usd} USD`);
  set("tokens", `${compact(o.tokens.input)} / ${compact(o.tokens.output)}`);
  set("errors", `${(100 * o.error_rate).toFixed(1)} %`, `${o.errors} errors`);
  set("latency", o.avg_latency_ms === null ? "–" : `${Math.round(o.avg_latency_ms)} ms`);
  set("unpriced", o.unpriced_events.toLocaleString());
}

function compact(n) {
  return Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 }).format(n);
}

function bucketLabel(iso, granularity) {
  // the API's bucket starts carry the zone offset; show the wall-clock part only
  const [day, time] = iso.split("T");
  if (granularity === "minute") return time.slice(0, 5);
  if (granularity === "hour") return `${day.slice(5)} ${time.slice(0, 5)}`;
  if (granularity === "month") return day.slice(0, 7);
  return day.slice(5);
}

// The one-line reason of an anomaly alert (its explanation, GET /v1/alerts).
function anomalyWhy(a) {
  const x = a.anomaly || {};
  const kinds = {
    volume: `volume: ${x.calls} calls, ${x.calls_ratio}x the usual`,
    size: `size: ${x.tokens_per_call} tokens per call, ${x.size_ratio}x the usual`,
    price_mix: `price/mix: cost per token ${x.price_ratio}x the usual`,
  };
  const top = (x.models || [])[0];
  const model = top ? `; ${top.model} ${Math.round(100 * top.share)}% of the excess` : "";
  return `${kinds[x.spike_type] || x.spike_type || "?"}${model}`;
}

function scopeText(scope) {
  return scope && scope.agent ? `${scope.project} / ${scope.agent}` : (scope && scope.project) || "";
}

function showSeries(series, anomalies) {
  const starts = series.points.map((p) => Date.parse(p.start));
  // an anomaly marks the bucket its episode started in
  const marks = new Map();
  for (const a of anomalies || []) {
    const at = Date.parse((a.anomaly && a.anomaly.episode_start) || a.window_start);
    let i = starts.length - 1;
    while (i >= 0 && starts[i] > at) i--;
    if (i < 0 || (i === starts.length - 1 && at - starts[i] > 2 * (starts[i] - (starts[i - 1] ?? starts[i])) + 60000)) continue;
    const text = `Anomaly: ${scopeText(a.scope)}, ${a.anomaly?.ratio ?? "?"}x (${anomalyWhy(a)})`;
    marks.set(i, marks.has(i) ? `${marks.get(i)}\n${text}` : text);
  }
  const points = series.points.map((p, i) => ({
    label: bucketLabel(p.start, series.granularity),
    title: `${p.start}\n${p.cost_usd} USD, ${p.calls} calls`,
    value: p.cost_usd_number,
    mark: marks.get(i),
  }));
  columnChart($("#spend-chart"), points, { format: formatUsd });
  $("#series-note").textContent = `${series.granularity} buckets, ${series.tz}`;
}

function showBreakdown(target, groups) {
  barList(target, groups.map((g) => ({ label: g.key, value: g.cost_usd_number, text: `${formatUsd(g.cost_usd_number)} · ${g.calls.toLocaleString()} calls` })));
}

async function showBudgets() {
  const panel = $("#budgets-panel");
  let listing;
  try {
    listing = await api("/v1/budgets");
  } catch (err) {
    if (err.status === 404) { panel.hidden = true; return; }
    throw err;
  }
  const budgets = Array.isArray(listing) ? listing : listing.budgets || listing.items || [];
  const rows = await Promise.all(budgets.map(async (b) => {
    let status = null;
    try { status = await api(`/v1/budgets/${encodeURIComponent(b.id)}/status`); } catch (err) { status = null; }
    return { budget: b, status: status && (status.status || status) };
  }));
  const container = $("#budgets");
  container.replaceChildren(...rows.map(({ budget, status }) => {
    const row = document.createElement("div");
    row.className = "budget";
    const name = document.createElement("span");
    name.textContent = `${budget.name || budget.id} (${budget.window})`;
    const spent = Number(status?.spent_usd ?? 0);
    const limit = Number(status?.limit_usd ?? budget.limit_usd);
    const percent = Number(status?.percent_used ?? (limit > 0 ? (100 * spent) / limit : 0));
    const text = document.createElement("span");
    text.textContent = status ? `${formatUsd(spent)} of ${formatUsd(limit)} · ${percent.toFixed(1)} %` : "no status yet";
    row.append(name, burnBar(percent, budget.thresholds), text);
    return row;
  }));
  panel.hidden = rows.length === 0;
}

// A threshold alert names its threshold; a forecast alert has none, it names the spend projected
// for the window's end.
function alertLevel(alert) {
  if (alert.threshold !== null && alert.threshold !== undefined) return `${alert.threshold} %`;
  if (alert.projected_usd) return `projected $${alert.projected_usd}`;
  if (alert.kind === "anomaly" && alert.anomaly) return `${alert.anomaly.ratio ?? "?"}x ${alert.anomaly.spike_type}`;
  return "";
}

async function loadAnomalies(params) {
  try {
    const listing = await api("/v1/alerts", { kind: "anomaly", limit: 100, ...(params.from ? { from: params.from } : {}) });
    return listing.alerts || [];
  } catch (err) {
    if (err.status === 404 || err.status === 422) return [];
    throw err;
  }
}

function showAnomalies(anomalies) {
  const body = $("#anomalies tbody");
  body.replaceChildren(...anomalies.slice(0, 20).map((a) => {
    const x = a.anomaly || {};
    return tableRow([
      [x.episode_start || a.fired_at || ""], [scopeText(a.scope)], [x.ratio !== null && x.ratio !== undefined ? `${x.ratio}x` : "new"],
      [`$${a.spent_usd} / $${a.limit_usd}`], [anomalyWhy(a), "why", `example events: ${(x.event_ids || []).join(", ")}`],
      [a.delivery_status || ""],
    ]);
  }));
  $("#anomalies-panel").hidden = anomalies.length === 0;
}

async function showAlerts() {
  const panel = $("#alerts-panel");
  let listing;
  try {
    listing = await api("/v1/alerts", { limit: 20 });
  } catch (err) {
    if (err.status === 404) { panel.hidden = true; return; }
    throw err;
  }
  const alerts = Array.isArray(listing) ? listing : listing.alerts || listing.items || [];
  const body = $("#alerts tbody");
  body.replaceChildren(...alerts.slice(0, 20).map((a) => {
    const delivery = a.delivery_status || (a.deliveries ? a.deliveries.map((d) => d.outcome).join(", ") : "");
    return tableRow([[a.fired_at || a.window_start || ""], [a.budget_name || a.budget_id || ""], [a.kind || ""],
      [alertLevel(a)], [a.spent_usd !== undefined ? `$${a.spent_usd}` : ""], [delivery]]);
  }));
  panel.hidden = alerts.length === 0;
}

// The forecast of the filtered scope (project, agent, model; the range does not apply: a forecast
// reads its own history). Busy or timed-out forecasts keep the last chart and say so.
async function showForecast(params) {
  const panel = $("#forecast-panel");
  let f;
  try {
    f = await api("/v1/forecast", { horizon: 30, tz: params.tz, project: params.project, agent: params.agent, model: params.model });
  } catch (err) {
    if (err.status === 404) { panel.hidden = true; return; }
    if (err.status === 429 || err.status === 503) { $("#forecast-note").textContent = `(${err.message})`; return; }
    throw err;
  }
  const points = f.series.map((d) => ({
    label: d.date.slice(5), point: Number(d.point_usd), lo80: Number(d.lo_80_usd), hi80: Number(d.hi_80_usd),
    lo95: Number(d.lo_95_usd), hi95: Number(d.hi_95_usd),
    title: `${d.date}\n${d.point_usd} USD (80 %: ${d.lo_80_usd}–${d.hi_80_usd}, 95 %: ${d.lo_95_usd}–${d.hi_95_usd})`,
  }));
  panel.hidden = false; // shown first: a hidden panel has no width to draw into
  bandChart($("#forecast-chart"), points, { format: formatUsd });
  $("#forecast-note").textContent = `${f.method}, ${f.history_days} days of history, bands 80 % and 95 %`;
  const me = f.month_end;
  $("#month-name").textContent = me.month;
  const point = $("#month-end-point");
  point.textContent = formatUsd(Number(me.point_usd));
  point.title = `${me.point_usd} USD`;
  $("#month-end-band").textContent = `(80 %: ${formatUsd(Number(me.lo_80_usd))}–${formatUsd(Number(me.hi_80_usd))})`;
  const total = $("#forecast-total");
  total.textContent = formatUsd(Number(f.total.point_usd));
  total.title = `${f.total.point_usd} USD`;
}

async function showRecommendations(params) {
  const panel = $("#recommendations-panel");
  let listing;
  try {
    listing = await api("/v1/recommendations", { project: params.project, agent: params.agent, model: params.model, limit: 20 });
  } catch (err) {
    if (err.status === 404) { panel.hidden = true; return; }
    throw err;
  }
  const items = listing.recommendations;
  const body = $("#recommendations tbody");
  body.replaceChildren(...items.map((r) => {
    const tr = tableRow([[r.priority, `priority-${r.priority}`], [r.type.replaceAll("_", " ")], [r.agent], [r.title],
      [formatUsd(Number(r.estimated_savings_monthly)), "num", `${r.estimated_savings_monthly} USD`]]);
    tr.title = r.description;
    return tr;
  }));
  const total = items.reduce((sum, r) => sum + Number(r.estimated_savings_monthly), 0);
  $("#savings-total").textContent = items.length ? `up to ${formatUsd(total)} a month` : "nothing to change";
  panel.hidden = false;
}

// Tracked (Spendstream) vs reported (the providers' cost reports) per day; hidden until a provider
// connection has reported something. A failure here never breaks the rest of the dashboard.
async function showReconciliation() {
  const panel = $("#reconciliation-panel");
  let answer;
  try {
    answer = await api("/v1/reconciliation", { granularity: "day", by: "model" });
  } catch (err) {
    panel.hidden = true;
    return;
  }
  const days = (answer.days || []).filter((d) => d.reported_cost_usd !== "0" || d.tracked_cost_usd !== "0").reverse();
  $("#reconciliation tbody").replaceChildren(...days.map((d) => {
    return tableRow([[d.date], [d.provider], [`$${d.tracked_cost_usd}`, "num"], [`$${d.reported_cost_usd}`, "num"],
      [`$${d.difference_usd}`, "num"], [d.drift_pct === null ? "–" : `${d.drift_pct} %`, "num"],
      [`$${d.unattributed_cost_usd}`, "num"]]);
  }));
  panel.hidden = !(answer.days || []).some((d) => d.reported_cost_usd !== "0");
}

function showUnpriced(models) {
  const body = $("#unpriced tbody");
  body.replaceChildren(...models.map((m) => {
    return tableRow([[m.provider], [m.model], [m.events.toLocaleString(), "num"],
      [m.last_seen.replace("T", " ").slice(0, 16)], [m.priced_now ? "yes" : "no"]]);
  }));
  $("#unpriced-empty").hidden = models.length > 0;
}

// Re-pricings (GET /v1/pricing/audit): one row per job, its newest audit entry (the audit lists
// newest first: proposed, started, done or failed). Hidden while there are none.
async function showRepricings() {
  const panel = $("#repricings-panel");
  let answer;
  try {
    answer = await api("/v1/pricing/audit");
  } catch (err) {
    panel.hidden = true;
    return;
  }
  const seen = new Set();
  const jobs = (answer.audit || []).filter((a) => !seen.has(a.job_id) && seen.add(a.job_id)).slice(0, 20);
  const usd = (nanos) => formatUsd(Number(nanos) / 1e9);
  $("#repricings tbody").replaceChildren(...jobs.map((a) => {
    const s = a.scope || {};
    const filters = ["provider", "model", "project"].filter((k) => s[k]).map((k) => `${k} ${s[k]}`);
    const scope = `${(s.from || "").slice(0, 10)} – ${(s.to || "").slice(0, 10)}${filters.length ? ", " + filters.join(", ") : ""}`;
    const tr = tableRow([[a.at.replace("T", " ").slice(0, 16)], [a.actor], [a.reason], [scope],
      [Number(a.events_changed).toLocaleString(), "num"], [usd(a.old_nanos), "num", `${a.old_nanos} nano-USD`],
      [usd(a.new_nanos), "num", `${a.new_nanos} nano-USD`], [a.status, `status-${a.status}`]]);
    tr.title = a.job_id;
    tr.dataset.job = a.job_id;
    return tr;
  }));
  panel.hidden = jobs.length === 0;
}

// -- refresh loop ----------------------------------------------------------------------------
async function refresh() {
  if (!session.access && !apiKey()) {
    setStatus("Log in, or enter an API key with the read scope.");
    return;
  }
  const mine = ++generation;
  const { params, granularity } = currentFilters();
  setStatus("Loading…");
  try {
    const [overview, series, agents, models, projects, unpriced, anomalies] = await Promise.all([
      api("/v1/analytics/overview", params),
      api("/v1/analytics/timeseries", { ...params, granularity }),
      api("/v1/analytics/breakdown", { ...params, by: "agent", limit: 12 }),
      api("/v1/analytics/breakdown", { ...params, by: "model", limit: 12 }),
      api("/v1/analytics/breakdown", { ...params, by: "project", limit: 12 }),
      api("/v1/pricing/unpriced"),
      loadAnomalies(params),
    ]);
    if (mine !== generation) return; // a newer refresh started while this one waited
    showCards(overview);
    showSeries(series, anomalies);
    showAnomalies(anomalies);
    showBreakdown($("#by-agent"), agents.groups);
    showBreakdown($("#by-model"), models.groups);
    showBreakdown($("#by-project"), projects.groups);
    showUnpriced(unpriced.models);
    if (!params.project) fillOptions(form.elements.project, projects.groups.map((g) => g.key));
    if (!params.agent) fillOptions(form.elements.agent, agents.groups.map((g) => g.key));
    if (!params.model) fillOptions(form.elements.model, models.groups.map((g) => g.key));
    await Promise.all([showBudgets(), showAlerts(), showForecast(params), showRecommendations(params), showReconciliation(),
      showRepricings()]);
    document.body.dataset.loaded = String(mine);
    setStatus(`Updated ${new Date().toLocaleTimeString()}`);
  } catch (err) {
    const refused = session.access ? "Your session was not accepted; log in again." : "That key was not accepted.";
    setStatus(err.status === 401 ? refused : `Error: ${err.message}`, true);
  }
}

function schedule() {
  clearTimeout(timer);
  const seconds = Number(form.elements.refresh.value);
  refresh().finally(() => {
    if (seconds > 0) timer = setTimeout(schedule, seconds * 1000);
  });
}

function init() {
  form.elements.tz.value = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  const keyInput = $("#api-key");
  $("#forget-key").hidden = !apiKey();
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (keyInput.value.trim()) sessionStorage.setItem(KEY_STORAGE, keyInput.value.trim());
    keyInput.value = "";
    $("#forget-key").hidden = !apiKey();
    schedule();
  });
  $("#forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    $("#forget-key").hidden = true;
    setStatus("Key forgotten.");
  });
  $("#login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const email = $("#login-email").value.trim();
    const password = $("#login-password").value;
    $("#login-password").value = "";
    try {
      adoptTokens(await call("POST", "/auth/login", { json: { email, password }, auth: false }));
      await loadMe();
      schedule();
    } catch (err) {
      setStatus(err.status === 429 ? err.message : `Login failed: ${err.message}`, true);
    }
  });
  $("#show-accept").addEventListener("click", () => {
    $("#accept-form").hidden = !$("#accept-form").hidden;
  });
  // joining with an invite token: the account is created (or an existing one checked by its
  // password), then logged in with the same password
  $("#accept-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const password = $("#accept-password").value;
    const body = { token: $("#accept-token").value.trim(), password, name: $("#accept-name").value.trim() || null };
    $("#accept-password").value = "";
    try {
      const joined = await call("POST", "/auth/accept-invite", { json: body, auth: false });
      adoptTokens(await call("POST", "/auth/login", { json: { email: joined.user.email, password }, auth: false }));
      session.org = joined.org.id;
      $("#accept-token").value = "";
      $("#accept-form").hidden = true;
      await loadMe();
      setStatus(`Joined ${joined.org.name} as ${joined.org.role}.`);
      schedule();
    } catch (err) {
      setStatus(`Invite refused: ${err.message}`, true);
    }
  });
  $("#logout").addEventListener("click", async () => {
    try { await call("POST", "/auth/logout"); } catch (err) { /* the session ends here either way */ }
    endSession();
    setStatus("Logged out.");
  });
  $("#org-switch").addEventListener("change", (event) => {
    session.org = event.target.value;
    sessionStorage.setItem(ORG_STORAGE, session.org);
    $("#org-role").textContent = currentRole();
    for (const name of ["project", "agent", "model"]) form.elements[name].value = "";
    showMembers().catch((err) => setStatus(`Error: ${err.message}`, true));
    schedule();
  });
  $("#invite-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(event.target);
    try {
      const invite = await call("POST", `/v1/orgs/${encodeURIComponent(session.org)}/invites`, {
        json: { email: data.get("email"), role: data.get("role") },
      });
      $("#invite-token").textContent = invite.token;
      $("#invite-result").hidden = false;
      event.target.reset();
      setStatus(invite.emailed ? `Invite e-mailed to ${invite.email}.` : `Invite made for ${invite.email}.`);
    } catch (err) {
      setStatus(`Invite refused: ${err.message}`, true);
    }
  });
  form.addEventListener("change", () => {
    form.classList.toggle("show-custom", form.elements.range.value === "custom");
    schedule();
  });
  form.addEventListener("submit", (event) => event.preventDefault());
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(schedule, 300);
  });
  // a reload of this tab resumes the session from its refresh token
  if (sessionStorage.getItem(REFRESH_STORAGE)) {
    refreshTokens().then((ok) => (ok ? loadMe() : null)).catch(() => null).finally(schedule);
  } else {
    schedule();
  }
}

init();
