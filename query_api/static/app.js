// The Spendstream dashboard: reads the query API with the key entered once (kept in this
// browser session only), redraws every few seconds. Budgets and alerts appear when the
// deployment serves those endpoints.
"use strict";

const KEY_STORAGE = "spendstream.apiKey";
const RANGES = { "1h": 3600e3, "24h": 86400e3, "7d": 7 * 86400e3, "30d": 30 * 86400e3, "90d": 90 * 86400e3 };
const { columnChart, barList, burnBar, formatUsd } = window.SpendCharts;

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

async function api(path, params) {
  const url = new URL(path, window.location.origin);
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
  }
  const response = await fetch(url, { headers: { Authorization: `Bearer ${apiKey()}` } });
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
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

function showSeries(series) {
  const points = series.points.map((p) => ({
    label: bucketLabel(p.start, series.granularity),
    title: `${p.start}\n${p.cost_usd} USD, ${p.calls} calls`,
    value: p.cost_usd_number,
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
  return "";
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
    const tr = document.createElement("tr");
    const delivery = a.delivery_status || (a.deliveries ? a.deliveries.map((d) => d.outcome).join(", ") : "");
    const cells = [a.fired_at || a.window_start || "", a.budget_name || a.budget_id || "", a.kind || "",
      alertLevel(a), a.spent_usd !== undefined ? `$${a.spent_usd}` : "", delivery];
    for (const value of cells) {
      const td = document.createElement("td");
      td.textContent = value;
      tr.append(td);
    }
    return tr;
  }));
  panel.hidden = alerts.length === 0;
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
    const tr = document.createElement("tr");
    const cells = [[d.date], [d.provider], [`$${d.tracked_cost_usd}`, "num"], [`$${d.reported_cost_usd}`, "num"],
      [`$${d.difference_usd}`, "num"], [d.drift_pct === null ? "–" : `${d.drift_pct} %`, "num"],
      [`$${d.unattributed_cost_usd}`, "num"]];
    for (const [value, cls] of cells) {
      const td = document.createElement("td");
      td.textContent = value;
      if (cls) td.className = cls;
      tr.append(td);
    }
    return tr;
  }));
  panel.hidden = !(answer.days || []).some((d) => d.reported_cost_usd !== "0");
}

function showUnpriced(models) {
  const body = $("#unpriced tbody");
  body.replaceChildren(...models.map((m) => {
    const tr = document.createElement("tr");
    for (const [value, cls] of [[m.provider], [m.model], [m.events.toLocaleString(), "num"], [m.last_seen.replace("T", " ").slice(0, 16)], [m.priced_now ? "yes" : "no"]]) {
      const td = document.createElement("td");
      td.textContent = value;
      if (cls) td.className = cls;
      tr.append(td);
    }
    return tr;
  }));
  $("#unpriced-empty").hidden = models.length > 0;
}

// -- refresh loop ----------------------------------------------------------------------------
async function refresh() {
  if (!apiKey()) {
    setStatus("Enter an API key with the read scope.");
    return;
  }
  const mine = ++generation;
  const { params, granularity } = currentFilters();
  setStatus("Loading…");
  try {
    const [overview, series, agents, models, projects, unpriced] = await Promise.all([
      api("/v1/analytics/overview", params),
      api("/v1/analytics/timeseries", { ...params, granularity }),
      api("/v1/analytics/breakdown", { ...params, by: "agent", limit: 12 }),
      api("/v1/analytics/breakdown", { ...params, by: "model", limit: 12 }),
      api("/v1/analytics/breakdown", { ...params, by: "project", limit: 12 }),
      api("/v1/pricing/unpriced"),
    ]);
    if (mine !== generation) return; // a newer refresh started while this one waited
    showCards(overview);
    showSeries(series);
    showBreakdown($("#by-agent"), agents.groups);
    showBreakdown($("#by-model"), models.groups);
    showBreakdown($("#by-project"), projects.groups);
    showUnpriced(unpriced.models);
    if (!params.project) fillOptions(form.elements.project, projects.groups.map((g) => g.key));
    if (!params.agent) fillOptions(form.elements.agent, agents.groups.map((g) => g.key));
    if (!params.model) fillOptions(form.elements.model, models.groups.map((g) => g.key));
    await Promise.all([showBudgets(), showAlerts(), showReconciliation()]);
    document.body.dataset.loaded = String(mine);
    setStatus(`Updated ${new Date().toLocaleTimeString()}`);
  } catch (err) {
    setStatus(err.status === 401 ? "That key was not accepted." : `Error: ${err.message}`, true);
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
  schedule();
}

init();
