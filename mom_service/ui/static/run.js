// One question's run on the playground: a column per member, filled live from the progress stream
// (X-MoM-Progress-Url, docs/ui.md), the answer from the chat stream itself, then the `mom` breakdown.

import { count, el, ms, usd } from "./common.js";

const STAT_FIELDS = [["latency", "latency"], ["tokens", "tokens"], ["cost", "cost"]];

function tokensOf(value) {
  if (value === null || value === undefined) return null;
  if (typeof value === "number") return value;
  if (typeof value.total_tokens === "number") return value.total_tokens;
  return (value.prompt_tokens || 0) + (value.completion_tokens || 0);
}

// A column's key: a member's answer under its name, any other stage's call (a ranking, a round) apart.
function keyOf(name, stage) {
  return !stage || stage === "answer" ? name : `${name} · ${stage}`;
}

export class Run {
  constructor() {
    this.columnsEl = document.getElementById("columns");
    this.synthesis = document.getElementById("synthesis");
    this.statusEl = document.getElementById("run-status");
    this.columns = new Map(); // key -> article
    this.current = new Map(); // member name -> key of the call it is making now
    this.done = false;
  }

  reset() {
    this.columnsEl.replaceChildren();
    this.columns.clear();
    this.current.clear();
    this.done = false;
    this.setText(this.synthesis, "");
    this.setStatus(this.synthesis, "waiting");
    for (const [field] of STAT_FIELDS) this.field(this.synthesis, field).textContent = "–";
    document.getElementById("breakdown-section").hidden = true;
    const total = document.getElementById("total-cost");
    total.textContent = "–";
    delete total.dataset.value;
  }

  say(text) {
    this.statusEl.textContent = text;
  }

  field(column, name) {
    return column.querySelector(`[data-field="${name}"]`);
  }

  setStatus(column, state) {
    const status = this.field(column, "status");
    status.textContent = state;
    status.dataset.state = state;
    column.dataset.status = state;
  }

  setText(column, text) {
    this.field(column, "text").textContent = text;
  }

  column(name, stage, model) {
    const key = keyOf(name, stage);
    let column = this.columns.get(key);
    if (!column) {
      column = el("article", { class: "column member", "data-member": name, "data-stage": stage || "answer" });
      const header = el("header");
      header.append(el("h3", {}, key), el("span", { class: "status", "data-field": "status" }, "waiting"));
      const stats = el("dl", { class: "stats" });
      for (const [field, label] of STAT_FIELDS) {
        const item = el("div");
        item.append(el("dt", {}, label), el("dd", { "data-field": field }, "–"));
        stats.append(item);
      }
      column.append(header, el("div", { class: "model", "data-field": "model" }), stats);
      column.append(el("div", { class: "text", "data-field": "text", "aria-live": "off" }));
      this.columnsEl.append(column);
      this.columns.set(key, column);
      this.setStatus(column, "waiting");
    }
    if (model) this.field(column, "model").textContent = model;
    this.current.set(name, key);
    return column;
  }

  stats(column, { latency_ms, tokens, cost }) {
    this.field(column, "latency").textContent = ms(latency_ms);
    this.field(column, "tokens").textContent = count(tokensOf(tokens));
    this.field(column, "cost").textContent = usd(cost);
  }

  // ---- the progress stream's events
  progress(type, data) {
    // a stream that lags behind the answer (read after it ended) only adds the members' texts
    if (this.done && !["member_delta", "member_done"].includes(type)) return;
    if (type === "run_started") {
      const members = (data.members || []).map((m) => (typeof m === "string" ? { name: m } : m));
      for (const member of members) {
        const column = this.column(member.name, "answer", member.model);
        if (member.status === "skipped") this.setStatus(column, "skipped");
      }
      this.say(`Asking ${members.length} members (${data.strategy || "synthesize"})…`);
    } else if (type === "member_started") {
      this.setStatus(this.column(data.name, data.stage, data.model), "running");
    } else if (type === "member_delta") {
      this.field(this.callColumn(data), "text").append(data.text);
    } else if (type === "member_done") {
      const column = this.callColumn(data);
      const text = this.field(column, "text");
      if (!text.textContent && data.text) text.textContent = data.text; // it did not stream: its whole answer
      if (this.done) return; // the breakdown's figures are final
      this.setStatus(column, data.status || "ok");
      this.stats(column, { ...data, tokens: data.tokens ?? data.usage });
    } else if (type === "stage_started") {
      this.say(`Stage: ${data.stage}…`);
    } else if (type === "concluding_started") {
      if (data.selected) {
        this.say(`Selected: ${data.selected}.`);
      } else {
        this.setStatus(this.synthesis, "running");
        this.say("Concluding…");
      }
    } else if (type === "run_done" && data.mom) {
      this.finish(data.mom, data.usage);
    } else if (type === "run_failed") {
      this.fail(data.error && data.error.message ? data.error.message : String(data.error || "failed"));
    }
  }

  // The column of the call an event names: its stage's, else the one that member is making now.
  callColumn(data) {
    if (data.stage) return this.column(data.name, data.stage, data.model);
    return this.columns.get(this.current.get(data.name)) || this.column(data.name, "answer");
  }

  // ---- the chat stream
  content(text) {
    if (this.field(this.synthesis, "status").dataset.state !== "running") this.setStatus(this.synthesis, "running");
    this.field(this.synthesis, "text").append(text);
  }

  fail(message) {
    this.setStatus(this.synthesis, "failed");
    this.say(`Failed: ${message}`);
  }

  // The answer's `mom` breakdown and usage: every call's final figures, the total cost.
  finish(mom, usage) {
    this.done = true;
    for (const report of [...(mom.members || []), ...(mom.stage_calls || [])]) {
      const column = this.column(report.name, report.stage, report.model);
      this.setStatus(column, report.cached ? "cached" : report.status);
      this.stats(column, { latency_ms: report.latency_ms, tokens: report.usage, cost: report.cost });
    }
    const concluding = mom.concluding;
    this.setStatus(this.synthesis, concluding ? concluding.status : "ok");
    if (concluding) this.stats(this.synthesis, { ...concluding, tokens: concluding.usage });
    this.breakdown(mom, usage);
    const how = mom.cache === "hit" ? " (from the response cache)" : mom.degraded ? " (degraded: not every member answered)" : "";
    this.say(`Done${how}.`);
  }

  breakdown(mom, usage) {
    const total = document.getElementById("total-cost");
    total.textContent = usd(mom.cost);
    total.dataset.value = JSON.stringify(mom.cost);
    document.getElementById("total-tokens").textContent = usage
      ? `(${count(usage.prompt_tokens)} prompt + ${count(usage.completion_tokens)} completion tokens)`
      : "";
    const rows = [];
    const calls = [...(mom.members || []), ...(mom.stage_calls || []), ...(mom.concluding_fallbacks || [])];
    if (mom.concluding) calls.push(mom.concluding);
    for (const report of calls) {
      const row = el("tr");
      row.append(
        el("td", {}, report.name),
        el("td", {}, report.stage || ""),
        el("td", {}, report.reason ? `${report.status} (${report.reason})` : report.status),
        el("td", { class: "num" }, ms(report.latency_ms)),
        el("td", { class: "num" }, count(tokensOf(report.usage))),
        el("td", { class: "num" }, usd(report.cost)),
      );
      rows.push(row);
    }
    document.querySelector("#breakdown tbody").replaceChildren(...rows);
    document.getElementById("notices").replaceChildren(...(mom.notices || []).map((n) => el("li", {}, n)));
    document.getElementById("breakdown-section").hidden = false;
  }
}

// Follow the progress stream of a run; closed at its end (EventSource would otherwise reconnect).
export function follow(url, run) {
  const source = new EventSource(url);
  const types = ["run_started", "member_started", "member_delta", "member_done", "stage_started",
    "concluding_started", "concluding_delta", "run_done", "run_failed"];
  for (const type of types) {
    source.addEventListener(type, (event) => {
      run.progress(type, JSON.parse(event.data));
      if (type === "run_done" || type === "run_failed") source.close();
    });
  }
  source.onerror = () => {
    if (run.done) source.close();
  };
  return source;
}

// Read a chat completion's SSE stream: content deltas to the answer, the last chunk's breakdown, an error event.
export async function readChat(response, run) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = frame.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        run.fail(chunk.error.message || "the stream ended with an error");
        continue;
      }
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) run.content(choice.delta.content);
      }
      if (chunk.mom) run.finish(chunk.mom, chunk.usage);
    }
  }
}
