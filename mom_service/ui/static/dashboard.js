// The usage dashboard: the usage API (/v1/metrics/usage) over a date range, as totals, lines over time (per day
// or hour, UTC), bars and tables per MoM model and per LLM, with latency percentiles. Chart.js is vendored
// (static/vendor/README.md) and loaded by a classic script before this module.

import { TokenRefused, count, el, getJson, ms, usd, withToken } from "./common.js";

const $ = (id) => document.getElementById(id);
const DAY_MS = 86_400_000;
const HOUR_MS = 3_600_000;
const MAX_DAYS = 366; // the usage API's longest range
const COLORS = ["#2557d6", "#d6452a", "#1f8a4c", "#b7791f", "#7b3fbf", "#0f8a99", "#c2307a", "#596275"];
const charts = new Map(); // canvas id -> Chart

function isoDate(date) {
  return date.toISOString().slice(0, 10);
}

function dayStart(value) {
  return Date.parse(`${value}T00:00:00Z`);
}

// The buckets of the range, each as the usage API names it, so that a bucket without requests shows as 0.
function buckets(startMs, endMs, per) {
  const step = per === "hour" ? HOUR_MS : DAY_MS;
  const keys = [];
  for (let t = startMs; t < endMs; t += step) {
    const iso = new Date(t).toISOString();
    keys.push(per === "hour" ? `${iso.slice(0, 13)}:00:00Z` : iso.slice(0, 10));
  }
  return keys;
}

function draw(id, type, labels, datasets, { money = false } = {}) {
  const existing = charts.get(id);
  if (existing) existing.destroy();
  const tick = money ? (value) => usd(value) : (value) => count(value);
  const chart = new window.Chart($(id), {
    type,
    data: {
      labels,
      datasets: datasets.map((set, index) => ({
        ...set,
        borderColor: COLORS[index % COLORS.length],
        backgroundColor: type === "bar" ? COLORS.map((c) => `${c}cc`) : COLORS[index % COLORS.length],
        pointRadius: labels.length > 60 ? 0 : 2,
        tension: 0,
        maxBarThickness: 64,
      })),
    },
    options: {
      animation: false,
      responsive: true,
      maintainAspectRatio: false,
      interaction: { mode: "index", intersect: false },
      plugins: { legend: { display: datasets.length > 1 } },
      scales: { y: { beginAtZero: true, ticks: { callback: tick } } },
    },
  });
  charts.set(id, chart);
}

function showTotals(totals) {
  const formats = {
    requests: count, errors: count, prompt_tokens: count, completion_tokens: count,
    cost: usd, cost_saved: usd, latency_ms_p50: ms, latency_ms_p95: ms,
  };
  for (const node of document.querySelectorAll("[data-total]")) {
    const name = node.dataset.total;
    node.dataset.value = JSON.stringify(totals[name]);
    node.textContent = formats[name](totals[name]);
  }
}

function showOverTime(report, labels) {
  const byKey = new Map(report.groups.map((g) => [g.key, g]));
  const series = (field) => labels.map((key) => (byKey.get(key) ? byKey.get(key)[field] || 0 : 0));
  draw("chart-requests", "line", labels, [
    { label: "requests", data: series("requests") },
    { label: "errors", data: series("errors") },
  ]);
  draw("chart-cost", "line", labels, [
    { label: "cost", data: series("cost") },
    { label: "cache savings", data: series("cost_saved") },
  ], { money: true });
  draw("chart-tokens", "line", labels, [
    { label: "prompt tokens", data: series("prompt_tokens") },
    { label: "completion tokens", data: series("completion_tokens") },
  ]);
}

function groupTable(id, heading, groups) {
  const head = el("tr");
  for (const name of [heading, "requests", "errors", "prompt tokens", "completion tokens", "cost", "cache savings",
    "p50", "p95"]) {
    head.append(el("th", { scope: "col", class: name === heading ? "" : "num" }, name));
  }
  const rows = groups.map((g) => {
    const row = el("tr", { "data-key": g.key });
    row.append(el("th", { scope: "row" }, g.key));
    for (const text of [count(g.requests), count(g.errors), count(g.prompt_tokens), count(g.completion_tokens),
      usd(g.cost), usd(g.cost_saved), ms(g.latency_ms_p50), ms(g.latency_ms_p95)]) {
      row.append(el("td", { class: "num" }, text));
    }
    return row;
  });
  if (rows.length === 0) {
    const row = el("tr");
    row.append(el("td", { colspan: "9" }, "No requests in this range."));
    rows.push(row);
  }
  const thead = el("thead");
  thead.append(head);
  const tbody = el("tbody");
  tbody.append(...rows);
  $(id).replaceChildren(thead, tbody);
}

function showGroups(report, chartId, tableId, heading) {
  const groups = report.groups;
  draw(chartId, "bar", groups.map((g) => g.key), [{ label: "cost", data: groups.map((g) => g.cost || 0) }],
    { money: true });
  groupTable(tableId, heading, groups);
}

async function load(event) {
  if (event) event.preventDefault();
  $("range-error").textContent = "";
  const start = dayStart($("start").value);
  const end = dayStart($("end").value) + DAY_MS;
  if (!(end > start)) {
    $("range-error").textContent = "'To' must not be before 'From'.";
    return;
  }
  if (end - start > MAX_DAYS * DAY_MS) {
    $("range-error").textContent = `Choose at most ${MAX_DAYS} days.`;
    return;
  }
  const per = $("bucket").value;
  const query = new URLSearchParams({ start: new Date(start).toISOString(), end: new Date(end).toISOString() });
  if ($("model-filter").value) query.set("model", $("model-filter").value);
  const ask = (groupBy) => getJson(`/v1/metrics/usage?${query}&group_by=${groupBy}`);
  $("range-status").textContent = "Loading…";
  try {
    const [overTime, perModel, perLlm] = await Promise.all([ask(per), ask("model"), ask("llm")]);
    showTotals(overTime.totals);
    showOverTime(overTime, buckets(start, end, per));
    showGroups(perModel, "chart-models", "table-models", "MoM model");
    showGroups(perLlm, "chart-llms", "table-llms", "LLM");
    $("range-status").textContent = `${overTime.period.start} to ${overTime.period.end}`;
  } catch (failure) {
    $("range-status").textContent = "";
    if (!(failure instanceof TokenRefused)) $("range-error").textContent = `Could not load the usage: ${failure.message}`;
  }
}

async function ready() {
  if (!$("start").value) {
    const today = new Date();
    $("end").value = isoDate(today);
    $("start").value = isoDate(new Date(today.getTime() - 6 * DAY_MS));
  }
  try {
    const listing = await getJson("/v1/models");
    const chosen = $("model-filter").value;
    $("model-filter").replaceChildren(el("option", { value: "" }, "all"),
      ...listing.data.map((m) => el("option", { value: m.id }, m.id)));
    $("model-filter").value = chosen;
  } catch (failure) {
    if (failure instanceof TokenRefused) return;
  }
  await load();
}

$("range-form").addEventListener("submit", load);
withToken(ready);
