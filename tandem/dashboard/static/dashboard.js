// Tandem's status page: polls data (relative to the page) and renders the router's replicas
// or one replica's engine. No framework, no build step.
"use strict";
const POLL_MS = 2000;
const COLUMNS = ["replica", "state", "breaker", "in flight", "running", "waiting", "KV used",
                 "prefix hits", "store hits", "requests"];
const $ = (id) => document.getElementById(id);
let timer;

function fmt(v, unit = "") {
  if (v === null || v === undefined) return "–";
  if (unit === "%") return (100 * v).toFixed(1) + "%";
  if (typeof v === "number" && !Number.isInteger(v)) return v.toFixed(2) + unit;
  return String(v) + unit;
}

function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function card(label, value) {
  const c = el("div", {class: "card"});
  c.append(el("div", {class: "label"}, label), el("div", {class: "value"}, value));
  return c;
}

function sparkline(title, xs, ys, unit) {
  const box = el("div", {class: "chart"});
  const last = [...ys].reverse().find((y) => y !== null && y !== undefined);
  const head = el("div");
  head.append(el("span", {}, title + " "), el("span", {class: "now"}, fmt(last, unit)));
  box.append(head);
  const pts = ys.map((y, i) => [i, y]).filter(([, y]) => y !== null && y !== undefined);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 100 30");
  svg.setAttribute("preserveAspectRatio", "none");
  if (pts.length > 1) {
    const max = Math.max(...pts.map(([, y]) => y)) || 1;
    const n = Math.max(ys.length - 1, 1);
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", pts.map(([i, y]) =>
      `${(100 * i / n).toFixed(2)},${(29 - 28 * y / max).toFixed(2)}`).join(" "));
    line.setAttribute("vector-effect", "non-scaling-stroke");
    svg.append(line);
  }
  box.append(svg);
  const span = xs.length ? Math.round(xs[xs.length - 1] - xs[0]) : 0;
  box.append(el("div", {class: "muted"}, pts.length > 1 ? `last ${span} s` : "collecting…"));
  return box;
}

function renderCharts(s) {
  $("charts").replaceChildren(
    sparkline("requests/s", s.t, s.request_rate, ""),
    sparkline("tokens/s", s.t, s.token_rate, ""),
    sparkline("TTFT", s.t, s.ttft_ms, " ms"),
    sparkline("inter-token", s.t, s.itl_ms, " ms"));
}

function renderRouter(d) {
  const up = d.replicas.filter((r) => r.state === "up").length;
  $("summary").replaceChildren(card("replicas up", `${up} / ${d.replicas.length}`),
                               card("in flight", fmt(d.inflight)),
                               card("queued at router", fmt(d.waiting)));
  $("replicas").hidden = false;
  $("replica-rows").replaceChildren(...d.replicas.map((r) => {
    const tr = el("tr", {class: "replica " + r.state.replace(" ", "-"), "data-url": r.url,
                         "data-state": r.state});
    const cells = [r.url, r.state, r.breaker, fmt(r.inflight), fmt(r.running), fmt(r.waiting),
                   fmt(r.kv_usage, "%"), fmt(r.hit_rate, "%"), fmt(r.store_hits),
                   fmt(r.requests)];
    cells.forEach((v, i) => {
      const td = el("td", {"data-label": COLUMNS[i]}, v);
      if (i === 1) td.className = "state state-" + r.state.replace(" ", "-");
      tr.append(td);
    });
    return tr;
  }));
}

function renderReplica(d) {
  $("replicas").hidden = true;
  $("summary").replaceChildren(
    card("model", d.model), card("dtype", d.dtype), card("device", d.device),
    card("quantization", d.quantization), card("KV cache dtype", d.kv_cache_dtype),
    card("tensor parallel", fmt(d.tensor_parallel_size)),
    card("KV capacity", fmt(d.kv_capacity_tokens, " tokens")), card("KV used", fmt(d.kv_usage, "%")),
    card("running", fmt(d.running)), card("waiting", fmt(d.waiting)),
    card("prefix hits", fmt(d.prefix_hit_rate, "%")));
}

async function poll() {
  const key = sessionStorage.getItem("tandem-key");
  try {
    const r = await fetch("data", {headers: key ? {Authorization: "Bearer " + key} : {}});
    if (r.status === 401) {
      $("login").hidden = false;
      $("login-error").textContent = key ? "that key was refused" : "";
      $("updated").textContent = "needs an API key";
    } else if (!r.ok) {
      $("updated").textContent = `error ${r.status}`;
    } else {
      const d = await r.json();
      $("login").hidden = true;
      $("kind").textContent = d.kind === "router" ? "router" : "replica";
      document.body.dataset.kind = d.kind;
      (d.kind === "router" ? renderRouter : renderReplica)(d);
      renderCharts(d.series);
      $("updated").textContent = "updated " + new Date(d.now * 1000).toLocaleTimeString();
      document.body.dataset.loaded = "1";
    }
  } catch (e) {
    $("updated").textContent = "unreachable: " + e;
  }
  clearTimeout(timer);
  timer = setTimeout(poll, POLL_MS);
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("tandem-key", $("key").value);
  poll();
});
poll();
