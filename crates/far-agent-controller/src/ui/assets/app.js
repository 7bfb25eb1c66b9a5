// FAR's UI: live agent state from one server-sent-events stream (api/stream): a snapshot, then
// deltas. No framework and no build step: the table renders only the rows in view, so 10,000
// agents stay responsive. Text goes in with textContent only (nothing from the server is
// parsed as HTML).
"use strict";

const ROW = 28; // px, as --row in app.css
const OVERSCAN = 10;
const COLUMNS = [
  ["name", "Name"], ["namespace", "Namespace"], ["phase", "Phase"], ["reason", "Reason"],
  ["host", "Host"], ["heartbeat", "Heartbeat"], ["exitCode", "Exit"], ["created", "Age"],
];

const state = {
  agents: new Map(), hosts: [], pools: [], leading: true,
  skew: 0, // server clock minus ours, ms
  shown: [], sort: { key: "created", dir: -1 }, selected: 0,
  view: "agents", detail: null,
};
// Read by the browser test.
window.farUi = { state, lastFilterMs: null, renders: 0 };

const $ = (id) => document.getElementById(id);
const el = (tag, text, cls) => {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
};

function serverNow() { return Date.now() + state.skew; }
function age(iso) {
  if (!iso) return "";
  const s = Math.max(0, Math.round((serverNow() - Date.parse(iso)) / 1000));
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.round(s / 60)}m`;
  if (s < 172800) return `${Math.round(s / 3600)}h`;
  return `${Math.round(s / 86400)}d`;
}

// --- the stream ---------------------------------------------------------------------------
function applySnapshot(s) {
  state.skew = Date.parse(s.now) - Date.now();
  state.leading = s.leading;
  state.agents = new Map(s.agents.map((a) => [a.key, a]));
  state.hosts = s.hosts;
  state.pools = s.pools;
  changed(true);
}

function applyDelta(d) {
  state.skew = Date.parse(d.now) - Date.now();
  for (const a of d.upsert) state.agents.set(a.key, a);
  for (const k of d.remove) state.agents.delete(k);
  if (d.hosts) state.hosts = d.hosts;
  if (d.pools) state.pools = d.pools;
  changed(d.upsert.length > 0 || d.remove.length > 0);
}
window.farUi.applySnapshot = applySnapshot;

function connect() {
  const source = new EventSource("api/stream");
  const status = $("connection");
  source.onopen = () => { status.textContent = "live"; status.className = "live"; };
  source.onerror = () => { status.textContent = "reconnecting…"; status.className = "down"; };
  source.addEventListener("snapshot", (e) => applySnapshot(JSON.parse(e.data)));
  source.addEventListener("delta", (e) => applyDelta(JSON.parse(e.data)));
}

let frame = 0;
let refilter = false;
// Coalesces work to one render per animation frame.
function changed(agents) {
  refilter ||= agents;
  if (frame) return;
  frame = requestAnimationFrame(() => {
    frame = 0;
    if (refilter) { applyFilter(); refilter = false; }
    renderAll();
  });
}

// --- agents table -------------------------------------------------------------------------
function applyFilter() {
  const t0 = performance.now();
  const ns = $("f-namespace").value, phase = $("f-phase").value, host = $("f-host").value;
  const text = $("f-text").value.trim().toLowerCase();
  const { key, dir } = state.sort;
  const rows = [];
  for (const a of state.agents.values()) {
    if (ns && a.namespace !== ns) continue;
    if (phase && a.phase !== phase) continue;
    if (host && a.host !== host) continue;
    if (text && !(`${a.key} ${a.reason} ${a.host ?? ""}`.toLowerCase().includes(text))) continue;
    rows.push(a);
  }
  rows.sort((x, y) => {
    const a = x[key] ?? "", b = y[key] ?? "";
    return (a < b ? -1 : a > b ? 1 : x.key < y.key ? -1 : 1) * dir;
  });
  state.shown = rows;
  state.selected = Math.min(state.selected, Math.max(0, rows.length - 1));
  window.farUi.lastFilterMs = performance.now() - t0;
}

function renderHead() {
  const head = $("table-head");
  head.replaceChildren();
  for (const [key, label] of COLUMNS) {
    const b = el("button", label);
    b.type = "button";
    b.setAttribute("role", "columnheader");
    b.setAttribute("aria-sort", state.sort.key === key ? (state.sort.dir > 0 ? "ascending" : "descending") : "none");
    b.addEventListener("click", () => {
      state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : 1 };
      applyFilter(); renderHead(); renderRows();
    });
    head.append(b);
  }
}

function renderRows() {
  window.farUi.renders++;
  const viewport = $("viewport"), rows = $("rows");
  const total = state.shown.length;
  $("spacer").style.height = `${total * ROW}px`;
  $("table").setAttribute("aria-rowcount", String(total));
  const first = Math.max(0, Math.floor(viewport.scrollTop / ROW) - OVERSCAN);
  const last = Math.min(total, Math.ceil((viewport.scrollTop + viewport.clientHeight) / ROW) + OVERSCAN);
  rows.style.top = `${first * ROW}px`;
  const out = [];
  for (let i = first; i < last; i++) {
    const a = state.shown[i];
    const r = el("div", undefined, i === state.selected ? "row selected" : "row");
    r.setAttribute("role", "row");
    r.setAttribute("aria-rowindex", String(i + 1));
    r.dataset.key = a.key;
    r.append(el("span", a.name), el("span", a.namespace));
    const p = el("span"); p.append(el("span", a.phase, `phase ${a.phase}`)); r.append(p);
    r.append(el("span", a.reason), el("span", a.host ?? ""), el("span", age(a.heartbeat)),
      el("span", a.exitCode ?? ""), el("span", age(a.created)));
    r.addEventListener("click", () => { state.selected = i; openDetail(a.key); });
    out.push(r);
  }
  rows.replaceChildren(...out);
  $("count").textContent = `${total} of ${state.agents.size} agents`;
}

function fillSelect(select, values) {
  const current = select.value;
  const have = new Set([...select.options].map((o) => o.value));
  const want = new Set(["", ...values]);
  if (have.size === want.size && [...want].every((v) => have.has(v))) return;
  select.replaceChildren(el("option", "all"));
  select.options[0].value = "";
  for (const v of [...values].sort()) select.append(el("option", v));
  select.value = want.has(current) ? current : "";
}

function renderSummary() {
  const counts = {};
  for (const a of state.agents.values()) counts[a.phase] = (counts[a.phase] ?? 0) + 1;
  const parts = ["Pending", "Running", "Completed", "Failed"].map((p) => `${counts[p] ?? 0} ${p}`);
  const ready = state.hosts.filter((h) => h.ready).length;
  $("summary").textContent = state.leading
    ? `${parts.join(" · ")} · hosts ${ready}/${state.hosts.length} ready`
    : "this replica does not lead: no live state";
}

// --- hosts and pools ----------------------------------------------------------------------
function renderHosts() {
  const grid = $("host-grid");
  grid.replaceChildren(...state.hosts.map((h) => {
    const down = !h.ready;
    const card = el("article", undefined, `host ${down ? "down" : h.unschedulable ? "cordoned" : "ready"}`);
    card.setAttribute("aria-label", `host ${h.name}`);
    card.dataset.host = h.name;
    card.append(el("h2", h.name));
    card.append(el("p", down ? "Unreachable or not ready" : h.unschedulable ? "Ready, cordoned" : "Ready", "state"));
    const dl = el("dl");
    const item = (k, v, share) => {
      const dd = el("dd", v);
      if (share !== undefined) {
        const bar = el("div", undefined, "bar"), fill = el("i");
        fill.style.width = `${Math.min(100, Math.round(share * 100))}%`;
        bar.append(fill); dd.append(bar);
      }
      dl.append(el("dt", k), dd);
    };
    item("vCPU", `${h.cpuAllocated} / ${h.cpu}`, h.cpu ? h.cpuAllocated / h.cpu : 0);
    item("Memory", `${h.memoryAllocatedMib} / ${h.memoryMib} MiB`, h.memoryMib ? h.memoryAllocatedMib / h.memoryMib : 0);
    item("Agents", h.agents);
    item("Last probe", h.lastProbe ? `${age(h.lastProbe)} ago` : "never");
    card.append(dl);
    return card;
  }));
}

function renderPools() {
  const body = $("pool-table").tBodies[0];
  body.replaceChildren(...state.pools.map((p) => {
    const tr = el("tr");
    for (const v of [p.key, p.idle, p.booting, p.busy, p.desired, p.claimRate, p.warmClaims, p.coldClaims]) {
      tr.append(el("td", v));
    }
    return tr;
  }));
}

function renderAll() {
  renderSummary();
  fillSelect($("f-namespace"), new Set([...state.agents.values()].map((a) => a.namespace)));
  fillSelect($("f-host"), new Set(state.hosts.map((h) => h.name)));
  if (state.view === "agents") renderRows();
  if (state.view === "hosts") renderHosts();
  if (state.view === "pools") renderPools();
}

// --- one agent ----------------------------------------------------------------------------
async function openDetail(key) {
  closeDetail();
  const [ns, name] = key.split("/");
  const abort = new AbortController();
  state.detail = { key, abort };
  show("detail");
  $("detail-title").textContent = key;
  $("detail-log").textContent = "";
  $("detail-close").focus();
  try {
    const r = await fetch(`api/agents/${encodeURIComponent(ns)}/${encodeURIComponent(name)}`, { signal: abort.signal });
    if (!r.ok) throw new Error(await r.text());
    renderDetail(await r.json());
  } catch (e) {
    if (!abort.signal.aborted) $("detail-status").replaceChildren(el("dt", "Error"), el("dd", e.message));
  }
  followLog(ns, name, abort.signal);
}

function renderDetail(d) {
  const s = d.status ?? {};
  const dl = $("detail-status");
  dl.replaceChildren();
  const item = (k, v) => { if (v !== undefined && v !== null && v !== "") dl.append(el("dt", k), el("dd", v)); };
  item("Phase", s.phase ?? "Pending"); item("Reason", s.reason); item("Message", s.message);
  item("Host", s.host); item("VM", s.vmUid ? `${s.vmUid} (${s.vmState ?? "?"})` : "");
  item("Size", s.vm ? `${s.vm.vcpu} vCPU, ${s.vm.memoryMiB} MiB` : "");
  item("Image", d.image); item("Pool", d.pool);
  item("Started", s.startTime); item("Finished", s.finishTime);
  item("Exit code", s.exitCode); item("Restarts", s.restartCount);
  item("Last heartbeat", s.lastHeartbeatTime ? `${age(s.lastHeartbeatTime)} ago` : "");
  const g = s.guest;
  if (g) {
    item("Boot to entrypoint", g.bootToEntrypointMs != null ? `${g.bootToEntrypointMs} ms` : "");
    item("Guest memory", `${g.memoryUsedMiB} / ${g.memoryTotalMiB} MiB`);
    item("Guest CPU", `${g.cpuUsedMs} ms`);
  }
  const body = $("detail-conditions").tBodies[0];
  body.replaceChildren(...(s.conditions ?? []).map((c) => {
    const tr = el("tr");
    for (const v of [c.type, c.status, c.reason, c.message, c.lastTransitionTime]) tr.append(el("td", v));
    return tr;
  }));
  const events = $("detail-events");
  if (d.events) {
    events.replaceChildren(...(d.events.length ? d.events.map((e) => el("li", `${e.time ?? ""} ${e.type} ${e.reason}: ${e.note ?? ""}`, e.type)) : [el("li", "none")]));
  } else {
    events.replaceChildren(el("li", `unavailable: ${d.eventsError}`));
  }
}

// The log tail, following live as `far logs -f` does, from the channel's route on this port.
async function followLog(ns, name, signal) {
  const pre = $("detail-log");
  try {
    const r = await fetch(`../v1/namespaces/${encodeURIComponent(ns)}/faragents/${encodeURIComponent(name)}/logs?follow=true`, { signal });
    if (!r.ok) { pre.textContent = (await r.text()) || `no log (${r.status})`; return; }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pre.textContent += decoder.decode(value, { stream: true });
      if (pre.textContent.length > 200000) pre.textContent = pre.textContent.slice(-150000);
      pre.scrollTop = pre.scrollHeight;
    }
  } catch (e) {
    if (!signal.aborted) pre.textContent += `\n[log stream ended: ${e.message}]`;
  }
}

function closeDetail() {
  if (state.detail) state.detail.abort.abort();
  state.detail = null;
}

// --- navigation ---------------------------------------------------------------------------
function show(view) {
  for (const id of ["agents", "hosts", "pools", "detail"]) $(id).hidden = id !== view;
  for (const b of document.querySelectorAll("nav button")) b.setAttribute("aria-pressed", String(b.dataset.view === view));
  state.view = view;
  if (view !== "detail") closeDetail();
  renderAll();
}

function moveSelection(to) {
  const total = state.shown.length;
  if (!total) return;
  state.selected = Math.max(0, Math.min(total - 1, to));
  const viewport = $("viewport");
  const top = state.selected * ROW;
  if (top < viewport.scrollTop) viewport.scrollTop = top;
  if (top + ROW > viewport.scrollTop + viewport.clientHeight) viewport.scrollTop = top + ROW - viewport.clientHeight;
  renderRows();
}

function start() {
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => show(b.dataset.view));
  for (const id of ["f-namespace", "f-phase", "f-host"]) $(id).addEventListener("change", () => { applyFilter(); renderRows(); });
  $("f-text").addEventListener("input", () => { applyFilter(); renderRows(); });
  $("filters").addEventListener("submit", (e) => e.preventDefault());
  $("viewport").addEventListener("scroll", () => renderRows(), { passive: true });
  $("viewport").addEventListener("keydown", (e) => {
    const page = Math.max(1, Math.floor($("viewport").clientHeight / ROW) - 1);
    const moves = { ArrowDown: 1, ArrowUp: -1, PageDown: page, PageUp: -page };
    if (e.key in moves) { moveSelection(state.selected + moves[e.key]); e.preventDefault(); }
    else if (e.key === "Home") { moveSelection(0); e.preventDefault(); }
    else if (e.key === "End") { moveSelection(state.shown.length - 1); e.preventDefault(); }
    else if (e.key === "Enter" && state.shown[state.selected]) {
      // Not passed on: the focus moves to the detail's Back button, which Enter would press.
      e.preventDefault();
      openDetail(state.shown[state.selected].key);
    }
  });
  $("detail-close").addEventListener("click", () => { show("agents"); $("viewport").focus(); });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.view === "detail") { show("agents"); $("viewport").focus(); }
  });
  renderHead();
  // Ages move with the clock: the rows in view (and the host cards) are redrawn each second.
  setInterval(() => { if (state.view === "agents") renderRows(); if (state.view === "hosts") renderHosts(); }, 1000);
  connect();
}

start();
