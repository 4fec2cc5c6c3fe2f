// Hand-written SVG charts for the dashboard: a time column chart and horizontal bars.
// No dependencies; every number shown comes from the API's exact decimal strings.
(() => {
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";

function svgEl(name, attrs, text) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

// A "nice" axis maximum: 1, 2 or 5 times a power of ten, at least the data maximum.
function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = Math.pow(10, Math.floor(Math.log10(value)));
  for (const step of [1, 2, 5, 10]) {
    if (step * power >= value) return step * power;
  }
  return 10 * power;
}

function formatUsd(value) {
  const abs = Math.abs(value);
  if (abs >= 1000) return "$" + value.toLocaleString(undefined, { maximumFractionDigits: 0 });
  if (abs >= 1) return "$" + value.toFixed(2);
  if (abs >= 0.01) return "$" + value.toFixed(3);
  if (abs === 0) return "$0";
  return "$" + value.toPrecision(2);
}

// points: [{label, title, value, mark?}] drawn as columns with a y axis (a point with a mark is
// highlighted, with the mark as its tooltip); returns the <svg>.
function columnChart(container, points, options) {
  const width = Math.max(container.clientWidth || 0, 320);
  const height = options.height || 240;
  const pad = { left: 64, right: 12, top: 12, bottom: 36 };
  const innerW = width - pad.left - pad.right;
  const innerH = height - pad.top - pad.bottom;
  const max = niceMax(Math.max(0, ...points.map((p) => p.value)));
  const svg = svgEl("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", class: "column-chart" });

  for (let i = 0; i <= 4; i++) {
    const v = (max * i) / 4;
    const y = pad.top + innerH - (innerH * i) / 4;
    svg.append(svgEl("line", { x1: pad.left, x2: width - pad.right, y1: y, y2: y, class: "grid" }));
    svg.append(svgEl("text", { x: pad.left - 6, y: y + 4, class: "axis", "text-anchor": "end" }, options.format(v)));
  }
  const slot = innerW / Math.max(points.length, 1);
  const barW = Math.max(1, slot * 0.8);
  const labelEvery = Math.ceil(points.length / Math.max(1, Math.floor(innerW / 70)));
  points.forEach((p, i) => {
    const h = max > 0 ? (innerH * p.value) / max : 0;
    const x = pad.left + i * slot + (slot - barW) / 2;
    const bar = svgEl("rect", {
      x, y: pad.top + innerH - h, width: barW, height: Math.max(h, p.value > 0 ? 1 : 0),
      class: p.mark ? "bar anomaly" : "bar", "data-value": p.value,
    });
    bar.append(svgEl("title", {}, p.mark ? `${p.title}\n${p.mark}` : p.title));
    svg.append(bar);
    if (p.mark) {
      // a marker above the column of a bucket with a spend anomaly (points[i].mark: its explanation)
      const marker = svgEl("text", { x: x + barW / 2, y: pad.top + 10, class: "anomaly-mark", "text-anchor": "middle" }, "▲");
      marker.append(svgEl("title", {}, p.mark));
      svg.append(marker);
    }
    if (i % labelEvery === 0) {
      svg.append(svgEl("text", { x: x + barW / 2, y: height - pad.bottom + 16, class: "axis", "text-anchor": "middle" }, p.label));
    }
  });
  container.replaceChildren(svg);
  return svg;
}

// rows: [{label, value, text}] as horizontal bars scaled to the largest value.
function barList(container, rows, options) {
  if (!rows.length) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = options.empty || "No data in this range.";
    container.replaceChildren(empty);
    return;
  }
  const max = Math.max(...rows.map((r) => r.value), 0) || 1;
  const list = document.createElement("ol");
  list.className = "bar-list";
  for (const row of rows) {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = row.label === "" ? "(none)" : row.label;
    name.title = name.textContent;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${Math.max(0.5, (100 * row.value) / max)}%`;
    track.append(fill);
    const text = document.createElement("span");
    text.className = "amount";
    text.textContent = row.text;
    item.append(name, track, text);
    list.append(item);
  }
  container.replaceChildren(list);
}

// A budget's burn: filled share of the limit, threshold ticks, colour by state.
function burnBar(percent, thresholds) {
  const track = document.createElement("div");
  track.className = "burn";
  const fill = document.createElement("div");
  fill.className = "burn-fill" + (percent >= 100 ? " over" : percent >= 80 ? " warn" : "");
  fill.style.width = `${Math.min(100, Math.max(0, percent))}%`;
  track.append(fill);
  for (const t of thresholds || []) {
    if (t > 0 && t < 100) {
      const tick = document.createElement("span");
      tick.className = "tick";
      tick.style.left = `${t}%`;
      tick.title = `${t}%`;
      track.append(tick);
    }
  }
  return track;
}

// A forecast: the 95 % and 80 % bands as areas, the point forecast as a line with a dot per day.
// points: [{label, title, point, lo80, hi80, lo95, hi95}] (numbers, USD).
function bandChart(container, points, options) {
  const width = Math.max(container.clientWidth || 0, 320);
  const height = options.height || 220;
  const pad = { left: 64, right: 12, top: 12, bottom: 36 };
  const innerW = width - pad.left - pad.right;
  const innerH = height - pad.top - pad.bottom;
  const max = niceMax(Math.max(0, ...points.map((p) => p.hi95)));
  const svg = svgEl("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", class: "band-chart" });
  for (let i = 0; i <= 4; i++) {
    const y = pad.top + innerH - (innerH * i) / 4;
    svg.append(svgEl("line", { x1: pad.left, x2: width - pad.right, y1: y, y2: y, class: "grid" }));
    svg.append(svgEl("text", { x: pad.left - 6, y: y + 4, class: "axis", "text-anchor": "end" }, options.format((max * i) / 4)));
  }
  const step = innerW / Math.max(points.length - 1, 1);
  const x = (i) => pad.left + i * step;
  const y = (v) => pad.top + innerH - (max > 0 ? (innerH * v) / max : 0);
  const area = (lo, hi) => points.map((p, i) => `${x(i)},${y(p[hi])}`).concat(
    points.map((p, i) => `${x(i)},${y(p[lo])}`).reverse()).join(" ");
  svg.append(svgEl("polygon", { points: area("lo95", "hi95"), class: "band95" }));
  svg.append(svgEl("polygon", { points: area("lo80", "hi80"), class: "band80" }));
  svg.append(svgEl("polyline", { points: points.map((p, i) => `${x(i)},${y(p.point)}`).join(" "), class: "point-line" }));
  const labelEvery = Math.ceil(points.length / Math.max(1, Math.floor(innerW / 70)));
  points.forEach((p, i) => {
    const dot = svgEl("circle", { cx: x(i), cy: y(p.point), r: 2.5, class: "point", "data-value": p.point });
    dot.append(svgEl("title", {}, p.title));
    svg.append(dot);
    if (i % labelEvery === 0) {
      svg.append(svgEl("text", { x: x(i), y: height - pad.bottom + 16, class: "axis", "text-anchor": "middle" }, p.label));
    }
  });
  container.replaceChildren(svg);
  return svg;
}

window.SpendCharts = { columnChart, barList, burnBar, bandChart, formatUsd };
})();
