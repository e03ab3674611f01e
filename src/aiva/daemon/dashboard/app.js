// aiva dashboard: plain JS, no build step, no external resources.
//
// Auth: the token arrives in the URL fragment (/ui/#token=...), which browsers never
// send to a server; it is moved to sessionStorage (this tab only) and the fragment is
// dropped from the address bar. Every API call sends it as `Authorization: Bearer`.
// Without a token (e.g. through the Unix socket) calls go out bare; a 401 shows the
// "Token needed" notice.
"use strict";

const API = "/v1";
const TOKEN_KEY = "aiva.token";
const REFRESH_MS = 2000;
const DESKTOP_RECHECK_MS = 15000;
const LOG_TAIL = 150;
const EVENT_LIMIT = 30;
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);

const ui = {
  token: null,
  selected: null, // sandbox name
  rows: new Map(), // name -> overview row
  interval: 5,
  view: "sandboxes",
  busy: new Set(), // names with an action under way
  message: null, // {name, text, error}
  desktops: new Map(), // name -> {url, port, checked, state}
  desktopSelected: null,
  desktopChecks: new Map(), // name -> when last asked (ms)
  tasks: [], // newest first, as GET /tasks answers
  taskBusy: new Set(), // task ids with an action under way
  taskMessage: null, // {text, error}
  rejecting: null, // task id the reject dialog is open for
  stopped: false, // refresh loop halted (token needed)
  timer: null,
};

// ---------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, message, hint) {
    super(message);
    this.status = status;
    this.hint = hint || "";
  }
}

function readToken() {
  const m = /(?:^#|[#&])token=([^&]*)/.exec(window.location.hash);
  if (m) {
    const token = decodeURIComponent(m[1]);
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    history.replaceState(null, "", window.location.pathname + window.location.search);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (ui.token) headers.Authorization = "Bearer " + ui.token;
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(API + path, init);
  } catch (exc) {
    throw new ApiError(0, "the aiva daemon does not answer", "is it still running? `aiva daemon status`");
  }
  let data = null;
  try {
    data = await response.json();
  } catch (exc) {
    data = null;
  }
  if (!response.ok) {
    const err = (data && data.error) || {};
    const e = new ApiError(response.status, err.message || response.statusText, err.hint);
    if (response.status === 401) tokenNeeded(e);
    throw e;
  }
  return data;
}

const enc = encodeURIComponent;

// ---------------------------------------------------------------- formatting

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return (i === 0 ? v.toFixed(0) : v >= 100 ? v.toFixed(0) : v.toFixed(1)) + " " + units[i];
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  let s = Math.max(0, Math.floor(seconds));
  const d = Math.floor(s / 86400);
  s -= d * 86400;
  const h = Math.floor(s / 3600);
  s -= h * 3600;
  const m = Math.floor(s / 60);
  s -= m * 60;
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m) return `${m}m ${String(s).padStart(2, "0")}s`;
  return `${s}s`;
}

function clock(ts) {
  const d = typeof ts === "number" ? new Date(ts * 1000) : new Date(ts);
  return d.toLocaleTimeString([], { hour12: false });
}

function shortImage(image) {
  return image.length > 40 ? image.slice(0, 37) + "…" : image;
}

// ---------------------------------------------------------------- token notice

function tokenNeeded(err) {
  ui.stopped = true;
  const had = Boolean(ui.token);
  if (had) {
    sessionStorage.removeItem(TOKEN_KEY);
    ui.token = null;
  }
  $("token-why").textContent = had
    ? "The token this tab had was refused (the daemon may have a new one)."
    : (err && err.message) || "";
  $("app").hidden = true;
  $("token-needed").hidden = false;
  setStatus("token needed", true);
}

function useToken() {
  const value = $("token-input").value.trim();
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  ui.token = value;
  $("token-input").value = "";
  $("token-needed").hidden = true;
  ui.stopped = false;
  start();
}

function setStatus(text, bad) {
  const node = $("status");
  node.textContent = text;
  node.classList.toggle("bad", Boolean(bad));
}

// ---------------------------------------------------------------- sandbox list

function renderList(rows) {
  const list = $("sandbox-list");
  const items = [];
  for (const row of rows) {
    const sample = row.latest;
    const figures = [];
    if (sample) {
      figures.push(`${sample.cpu_percent.toFixed(1)}% CPU`);
      figures.push(`${bytes(sample.mem_used)} mem`);
    }
    const item = el("li", {
      class: "sandbox" + (row.name === ui.selected ? " selected" : ""),
      "data-name": row.name,
      "data-state": row.state,
      tabIndex: 0,
      title: row.error || "",
    },
      el("div", { class: "row1" },
        el("span", { class: "name", text: row.name }),
        ui.desktops.has(row.name) ? el("span", { class: "pill desktop-pill", text: "desktop" }) : null,
        el("span", { class: `badge state-${row.state}`, text: row.state })),
      el("div", { class: "row2 muted" },
        el("span", { class: "backend", text: row.backend }),
        el("span", { class: "image", text: shortImage(row.image) }),
        el("span", { class: "uptime", text: row.state === "running" ? "up " + duration(row.uptime) : "" })),
      row.ports.length ? el("div", { class: "row3 ports muted", text: row.ports.join("  ") }) : null,
      figures.length ? el("div", { class: "row3 figures muted", text: figures.join(" · ") }) : null,
    );
    item.addEventListener("click", () => select(row.name));
    item.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") select(row.name);
    });
    items.push(item);
  }
  list.replaceChildren(...items);
  $("empty").hidden = rows.length > 0;
  $("count").textContent = rows.length ? String(rows.length) : "";
}

function select(name) {
  if (ui.selected !== name) {
    ui.selected = name;
    ui.message = null;
    $("events").replaceChildren();
    $("logs").textContent = "";
    clearChart($("chart-cpu"), "loading…");
    clearChart($("chart-mem"), "loading…");
  }
  showView("sandboxes");
  renderList([...ui.rows.values()]);
  renderDetail();
  refreshDetail();
}

// ---------------------------------------------------------------- detail

const ALLOWED = {
  start: ["stopped", "error"],
  stop: ["running", "paused", "error", "stopping"],
  snapshot: ["running", "stopped"],
  delete: ["creating", "running", "paused", "stopping", "stopped", "error"],
};

function renderDetail() {
  const row = ui.rows.get(ui.selected);
  $("nothing-selected").hidden = Boolean(row);
  $("detail").hidden = !row;
  if (!row) return;
  $("d-name").textContent = row.name;
  const badge = $("d-state");
  badge.textContent = row.state;
  badge.className = `badge state-${row.state}`;
  const busy = ui.busy.has(row.name);
  for (const button of document.querySelectorAll("#detail .actions button")) {
    const action = button.dataset.action;
    if (action === "desktop") {
      button.hidden = !ui.desktops.has(row.name);
      continue;
    }
    button.disabled = busy || !ALLOWED[action].includes(row.state);
  }
  const msg = $("d-message");
  const m = ui.message && ui.message.name === row.name ? ui.message : null;
  msg.hidden = !m;
  if (m) {
    msg.textContent = m.text;
    msg.classList.toggle("error", Boolean(m.error));
  }
  const facts = [
    ["backend", row.backend],
    ["image", row.image + (row.template ? ` (template ${row.template})` : "")],
    ["cpus", row.cpu_limit ? String(row.cpu_limit) : `no limit (${row.host_cpus} on this host)`],
    ["memory", bytes(row.memory)],
    ["ports", row.ports.length ? row.ports.join(", ") : "–"],
    ["uptime", row.state === "running" ? duration(row.uptime) : "–"],
    ["id", row.id],
  ];
  if (row.error) facts.push(["error", row.error]);
  $("d-facts").replaceChildren(...facts.flatMap(([k, v]) => [
    el("dt", { text: k }), el("dd", { text: v, "data-fact": k })]));
}

async function refreshDetail() {
  const name = ui.selected;
  const row = ui.rows.get(name);
  if (!row) return;
  const [history, events, logs] = await Promise.allSettled([
    api("GET", `/sandboxes/${enc(name)}/metrics/history?limit=360`),
    api("GET", `/events?sandbox_id=${enc(row.id)}&limit=${EVENT_LIMIT}`),
    api("GET", `/sandboxes/${enc(name)}/logs?tail=${LOG_TAIL}`),
  ]);
  if (ui.selected !== name) return; // the user moved on meanwhile
  if (history.status === "fulfilled") renderCharts(history.value, row);
  if (events.status === "fulfilled") renderEvents(events.value);
  if (logs.status === "fulfilled") renderLogs(logs.value);
  else renderLogs([], logs.reason);
}

// What an event says, in words: a command event names the command and how it ended.
function eventText(ev) {
  const d = ev.data || {};
  if (ev.kind === "command" && Array.isArray(d.cmd)) {
    const cmd = d.cmd.length === 3 && d.cmd[0] === "/bin/sh" && d.cmd[1] === "-c"
      ? d.cmd[2] : d.cmd.map(shellQuote).join(" "); // a string command ran as sh -c
    const how = d.background ? `started in the background (pid ${d.pid})`
      : `exit ${d.exit_code}` + (typeof d.duration === "number" ? ` in ${seconds(d.duration)}` : "")
        + (d.timed_out ? " (timed out)" : "");
    return `$ ${cmd} → ${how}`;
  }
  return Object.entries(d)
    .filter(([, v]) => v !== null && typeof v !== "object")
    .map(([k, v]) => `${k}=${v}`).join(" ");
}

function shellQuote(arg) {
  return /^[\w@%+=:,./-]+$/.test(arg) ? arg : `'${arg.replace(/'/g, "'\\''")}'`;
}

function seconds(s) {
  if (s < 1) return `${(s * 1000).toFixed(s < 0.01 ? 1 : 0)} ms`;
  return s < 60 ? `${s.toFixed(1)} s` : duration(s);
}

function renderEvents(events) {
  const items = events.slice().reverse().map((ev) => {
    const data = eventText(ev);
    return el("li", { "data-kind": ev.kind },
      el("time", { text: clock(ev.ts) }),
      el("span", { class: `kind kind-${ev.kind}`, text: ev.kind }),
      el("span", { class: "data muted", text: data.length > 120 ? data.slice(0, 117) + "…" : data }));
  });
  if (!items.length) items.push(el("li", { class: "muted", text: "no events yet" }));
  $("events").replaceChildren(...items);
}

function renderLogs(lines, err) {
  const pre = $("logs");
  const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
  if (err) {
    pre.textContent = `(logs unavailable: ${err.message})`;
    return;
  }
  pre.textContent = lines.length
    ? lines.map((l) => `${clock(l.ts)} ${l.source.padEnd(7)} ${l.text.replace(/\n+$/, "")}`).join("\n")
    : "(no log lines yet)";
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

// ---------------------------------------------------------------- charts

function clearChart(node, text) {
  node.replaceChildren(svg("text", { x: 300, y: 90, class: "placeholder", "text-anchor": "middle" }, text));
  node.dataset.points = "0";
}

// The smallest 1, 2 or 5 times a power of `base` that is >= v.
function niceCeil(v, base) {
  let unit = 1;
  while (unit * 10 <= v) unit *= 10;
  for (const step of [1, 2, 5, 10]) {
    if (unit * step >= v) return unit * step * (base || 1);
  }
  return unit * 10 * (base || 1);
}

function renderCharts(history, row) {
  const samples = history.samples;
  const interval = history.interval;
  // Scales follow the data (a flat line at the floor tells nothing); the captions say
  // what the ceiling is: 100% per CPU, and the memory limit.
  const cpuLimit = 100 * (row.cpu_limit || row.host_cpus || 1);
  const cpuPeak = Math.max(0, ...samples.map((s) => s.cpu_percent));
  const cpuMax = Math.min(Math.max(cpuLimit, cpuPeak), niceCeil(Math.max(cpuPeak * 1.25, 5)));
  drawChart($("chart-cpu"), samples.map((s) => [s.ts, s.cpu_percent]), {
    max: cpuMax, label: (v) => `${v.toFixed(v < 10 && v % 1 ? 1 : 0)}%`, interval, cls: "cpu",
  });
  const MiB = 1024 * 1024;
  const memTotal = Math.max(0, ...samples.map((s) => s.mem_total));
  const memPeak = Math.max(0, ...samples.map((s) => s.mem_used));
  const memNice = niceCeil(Math.max(memPeak * 1.25, MiB) / MiB, MiB);
  const memMax = memTotal > 0 ? Math.min(Math.max(memTotal, memPeak), memNice) : memNice;
  drawChart($("chart-mem"), samples.map((s) => [s.ts, s.mem_used]), {
    max: memMax, label: bytes, interval, cls: "mem",
  });
  const last = samples[samples.length - 1];
  $("cpu-now").textContent = last
    ? `${last.cpu_percent.toFixed(1)}% ` + (row.cpu_limit
      ? `(limit ${cpuLimit.toFixed(0)}%)` : `(no limit: ${row.host_cpus} host CPUs)`) : "";
  $("mem-now").textContent = last
    ? `${bytes(last.mem_used)} of ${bytes(last.mem_total)}` : "";
}

function drawChart(node, points, opts) {
  const W = 600, H = 170, L = 64, R = 12, T = 12, B = 24;
  node.dataset.points = String(points.length);
  if (!points.length) {
    clearChart(node, `waiting for samples (the daemon samples every ${opts.interval} s)`);
    return;
  }
  const t1 = Math.max(points[points.length - 1][0], Date.now() / 1000 - opts.interval);
  const t0 = Math.min(points[0][0], t1 - Math.max(30, 6 * opts.interval));
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => T + (1 - v / opts.max) * (H - T - B);
  const parts = [];
  for (const frac of [0, 0.5, 1]) {
    const v = opts.max * frac;
    parts.push(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
    parts.push(svg("text", { x: L - 6, y: y(v) + 4, class: "axis", "text-anchor": "end" }, opts.label(v)));
  }
  parts.push(svg("text", { x: L, y: H - 6, class: "axis" }, clock(t0)));
  parts.push(svg("text", { x: W - R, y: H - 6, class: "axis", "text-anchor": "end" }, clock(t1)));
  const coords = points.map(([t, v]) => `${x(t).toFixed(1)},${y(Math.min(v, opts.max)).toFixed(1)}`);
  if (points.length > 1) {
    const base = y(0).toFixed(1);
    const first = x(points[0][0]).toFixed(1);
    const lastX = x(points[points.length - 1][0]).toFixed(1);
    parts.push(svg("path", { d: `M${first},${base} L${coords.join(" L")} L${lastX},${base} Z`, class: `area ${opts.cls}` }));
    parts.push(svg("path", { d: "M" + coords.join(" L"), class: `line ${opts.cls}` }));
  }
  const [lx, ly] = coords[coords.length - 1].split(",");
  parts.push(svg("circle", { cx: lx, cy: ly, r: 3.5, class: `dot ${opts.cls}` }));
  node.replaceChildren(...parts);
}

// ---------------------------------------------------------------- actions

async function act(action) {
  const name = ui.selected;
  if (!name || ui.busy.has(name)) return;
  if (action === "desktop") {
    ui.desktopSelected = name;
    showView("desktops");
    return;
  }
  if (action === "delete") {
    $("confirm-name").textContent = name;
    $("confirm-volumes").checked = false;
    $("confirm").showModal();
    return;
  }
  const doing = { start: "starting", stop: "stopping", snapshot: "taking a snapshot of" }[action];
  await run(name, `${doing} ${name}…`, async () => {
    if (action === "snapshot") {
      const snap = await api("POST", `/sandboxes/${enc(name)}/snapshots`, { tag: null });
      return `snapshot ${snap.tag || ""} saved`;
    }
    const sb = await api("POST", `/sandboxes/${enc(name)}/${action}`);
    return `${name} is ${sb.state}`;
  });
}

async function confirmDelete() {
  const name = ui.selected;
  const volumes = $("confirm-volumes").checked;
  $("confirm").close();
  await run(name, `deleting ${name}…`, async () => {
    await api("DELETE", `/sandboxes/${enc(name)}?volumes=${volumes}`);
    ui.desktops.delete(name);
    return `${name} deleted`;
  });
}

async function run(name, pending, work) {
  ui.busy.add(name);
  ui.message = { name, text: pending };
  renderDetail();
  try {
    const text = await work();
    ui.message = { name, text };
  } catch (err) {
    ui.message = { name, text: err.message + (err.hint ? ` (${err.hint})` : ""), error: true };
  } finally {
    ui.busy.delete(name);
  }
  await tick();
}

// ---------------------------------------------------------------- desktops

function loopback(url) {
  try {
    const u = new URL(url);
    return (u.protocol === "http:" || u.protocol === "https:")
      && ["127.0.0.1", "localhost", "[::1]"].includes(u.hostname);
  } catch (exc) {
    return false;
  }
}

async function checkDesktops(rows) {
  const now = Date.now();
  // only desktop sandboxes have a desktop to ask for (others would answer 404)
  const running = new Set(rows.filter((r) => r.state === "running" && r.desktop)
    .map((r) => r.name));
  for (const name of [...ui.desktops.keys()]) {
    if (!running.has(name)) ui.desktops.delete(name);
  }
  const due = [...running].filter((name) => {
    const known = ui.desktopChecks.get(name);
    return !known || now - known > DESKTOP_RECHECK_MS;
  });
  await Promise.allSettled(due.map(async (name) => {
    ui.desktopChecks.set(name, now);
    try {
      const d = await api("GET", `/sandboxes/${enc(name)}/desktop`);
      if (d && typeof d.url === "string") ui.desktops.set(name, d);
    } catch (err) {
      ui.desktops.delete(name); // 404: no desktop, 409: not running
    }
  }));
  for (const name of [...ui.desktopChecks.keys()]) {
    if (!running.has(name)) ui.desktopChecks.delete(name); // check again once it runs
  }
}

function renderDesktops() {
  const names = [...ui.desktops.keys()].sort();
  $("desktop-count").textContent = String(names.length);
  if (!names.includes(ui.desktopSelected)) ui.desktopSelected = names[0] || null;
  $("desktop-tabs").replaceChildren(...names.map((name) => {
    const tab = el("button", {
      type: "button",
      class: "tab" + (name === ui.desktopSelected ? " active" : ""),
      "data-desktop": name,
      text: name,
    });
    tab.setAttribute("role", "tab");
    tab.setAttribute("aria-selected", String(name === ui.desktopSelected));
    tab.addEventListener("click", () => {
      ui.desktopSelected = name;
      renderDesktops();
    });
    return tab;
  }));
  $("no-desktops").hidden = names.length > 0;
  const frame = $("desktop-frame");
  const d = ui.desktopSelected ? ui.desktops.get(ui.desktopSelected) : null;
  const err = $("desktop-error");
  if (d && !loopback(d.url)) {
    err.textContent = `not showing ${ui.desktopSelected}'s desktop: ${d.url} is not on this machine`;
    err.hidden = false;
  } else {
    err.hidden = true;
  }
  const url = d && loopback(d.url) ? d.url : null;
  frame.hidden = !url || ui.view !== "desktops";
  const link = $("desktop-open");
  link.hidden = !url;
  if (url) link.href = url;
  if (ui.view !== "desktops") return; // keep the VNC connection closed while not shown
  if (url && frame.dataset.url !== url) {
    frame.dataset.url = url;
    frame.dataset.sandbox = ui.desktopSelected;
    frame.src = url;
  } else if (!url && frame.dataset.url) {
    delete frame.dataset.url;
    delete frame.dataset.sandbox;
    frame.src = "about:blank";
  }
}

function showView(view) {
  ui.view = view;
  $("panel-sandbox").hidden = view !== "sandboxes";
  $("panel-desktops").hidden = view !== "desktops";
  $("panel-tasks").hidden = view !== "tasks";
  for (const [id, name] of [["view-sandboxes", "sandboxes"], ["view-desktops", "desktops"],
    ["view-tasks", "tasks"]]) {
    $(id).classList.toggle("active", view === name);
    $(id).setAttribute("aria-selected", String(view === name));
  }
  if (view !== "desktops") {
    const frame = $("desktop-frame");
    if (frame.dataset.url) {
      delete frame.dataset.url;
      frame.src = "about:blank";
    }
  }
  renderDesktops();
}

// ---------------------------------------------------------------- tasks

const OUTCOMES = ["succeeded", "failed", "rolled_back"];

function taskDuration(t) {
  if (!t.started_at || !t.finished_at) return null;
  return Math.max(0, (new Date(t.finished_at) - new Date(t.started_at)) / 1000);
}

function median(values) {
  if (!values.length) return null;
  const v = values.slice().sort((a, b) => a - b);
  const mid = (v.length - 1) / 2;
  return (v[Math.floor(mid)] + v[Math.ceil(mid)]) / 2;
}

function money(v) {
  return v === null || v === undefined ? "–" : String(Number(Number(v).toPrecision(4)));
}

// Totals over the evaluator's rows (GET /eval); p50 over the finished runs listed, with
// the evaluator's rule (only tasks that ran to an outcome count).
function renderEval(rows) {
  const count = rows.reduce((n, r) => n + r.count, 0);
  const ok = rows.reduce((n, r) => n + r.succeeded, 0);
  const cost = rows.reduce((n, r) => n + r.cost, 0);
  const p50 = median(ui.tasks.filter((t) => OUTCOMES.includes(t.state))
    .map(taskDuration).filter((d) => d !== null));
  const values = {
    runs: String(count),
    success_rate: count ? `${Math.round((100 * ok) / count)}% (${ok}/${count})` : "–",
    p50: p50 === null ? "–" : `${p50 < 10 ? p50.toFixed(2) : p50.toFixed(0)} s`,
    cost_per_success: ok ? money(cost / ok) : "–",
  };
  for (const [key, text] of Object.entries(values)) {
    document.querySelector(`#eval-summary [data-eval="${key}"]`).textContent = text;
  }
  $("eval-summary").title = rows.map((r) =>
    `${r.key}: ${r.count} runs, ${Math.round(100 * (r.success_rate || 0))}% ok`).join("\n");
}

function taskButton(task, action, label, cls) {
  const button = el("button", {
    type: "button", class: cls || null, "data-action": action, text: label,
    disabled: ui.taskBusy.has(task.id),
  });
  button.addEventListener("click", () => taskAct(task.id, action));
  return button;
}

function renderTasks() {
  const tasks = ui.tasks;
  const awaiting = tasks.filter((t) => t.state === "awaiting_approval" && !t.decision);
  $("awaiting-count").textContent = String(awaiting.length);
  $("awaiting-count").classList.toggle("hot", awaiting.length > 0);
  $("task-rows").replaceChildren(...tasks.map((t) => {
    const command = t.name || t.command.join(" ");
    const buttons = [];
    if (t.state === "awaiting_approval" && !t.decision) {
      buttons.push(taskButton(t, "approve", "Approve", "primary"));
      buttons.push(taskButton(t, "reject", "Reject", "danger"));
    }
    if (t.state === "queued" || t.state === "awaiting_approval") {
      buttons.push(taskButton(t, "cancel", "Cancel"));
    }
    const state = t.state + (t.decision ? ` (${t.decision})` : "");
    return el("tr", {
      class: "task", "data-id": t.id, "data-state": t.state, "data-decision": t.decision || "",
    },
      el("td", { class: "col-id", text: t.id }),
      el("td", { class: "col-command", text: command, title: t.command.join(" ") }),
      el("td", { class: "col-priority", text: t.priority }),
      el("td", { class: "col-state" }, el("span", { class: `badge state-${t.state}`, text: state })),
      el("td", { class: "col-tries", text: `${t.attempts}/${t.max_attempts}` }),
      el("td", { class: "col-cost", text: money(t.cost) }),
      el("td", { class: "col-sandbox", text: t.sandbox || "–", title: t.sandbox || "" }),
      el("td", { class: "col-reason", text: t.reason || "", title: t.reason || "" }),
      el("td", { class: "col-actions" }, ...buttons));
  }));
  $("no-tasks").hidden = tasks.length > 0;
  const msg = $("tasks-message");
  msg.hidden = !ui.taskMessage;
  if (ui.taskMessage) {
    msg.textContent = ui.taskMessage.text;
    msg.classList.toggle("error", Boolean(ui.taskMessage.error));
  }
}

async function refreshTasks() {
  const [tasks, report] = await Promise.allSettled([
    api("GET", "/tasks"),
    ui.view === "tasks" ? api("GET", "/eval?by=task") : Promise.resolve(null),
  ]);
  if (tasks.status === "fulfilled") ui.tasks = tasks.value;
  renderTasks();
  if (report.status === "fulfilled" && report.value) renderEval(report.value);
  if (tasks.status === "rejected" && ui.view === "tasks") throw tasks.reason;
}

async function taskAct(id, action) {
  if (ui.taskBusy.has(id)) return;
  if (action === "reject") {
    ui.rejecting = id;
    $("reject-id").textContent = id;
    $("reject-reason").value = "";
    $("reject").showModal();
    return;
  }
  await runTask(id, action, undefined);
}

async function confirmReject() {
  const id = ui.rejecting;
  const reason = $("reject-reason").value.trim();
  $("reject").close();
  ui.rejecting = null;
  if (id) await runTask(id, "reject", { reason: reason || null });
}

async function runTask(id, action, body) {
  const done = { approve: "approved", reject: "rejected", cancel: "cancelled" }[action];
  ui.taskBusy.add(id);
  ui.taskMessage = { text: `${action} ${id}…` };
  renderTasks();
  try {
    const task = await api("POST", `/tasks/${enc(id)}/${action}`, body);
    ui.taskMessage = { text: `${done} ${task.id}` + (action === "cancel" ? ""
      : "; the daemon's scheduler finishes it at its next tick") };
  } catch (err) {
    ui.taskMessage = { text: err.message + (err.hint ? ` (${err.hint})` : ""), error: true };
  } finally {
    ui.taskBusy.delete(id);
  }
  await tick();
}

// ---------------------------------------------------------------- refresh loop

async function tick() {
  if (ui.stopped) return;
  try {
    const overview = await api("GET", "/overview");
    ui.interval = overview.interval;
    ui.rows = new Map(overview.sandboxes.map((r) => [r.name, r]));
    $("app").hidden = false;
    $("token-needed").hidden = true;
    await checkDesktops(overview.sandboxes);
    $("loading").hidden = true;
    const gone = !ui.selected || !ui.rows.has(ui.selected);
    if (gone && overview.sandboxes.length && ui.view === "sandboxes") {
      ui.selected = overview.sandboxes[0].name; // the landing view shows the first one
      clearChart($("chart-cpu"), "loading…");
      clearChart($("chart-mem"), "loading…");
    }
    renderList(overview.sandboxes);
    renderDesktops();
    renderDetail();
    if (ui.selected && ui.rows.has(ui.selected)) await refreshDetail();
    await refreshTasks();
    setStatus(`updated ${clock(overview.now)}`);
  } catch (err) {
    if (err.status !== 401) setStatus(`${err.message}${err.hint ? " — " + err.hint : ""}`, true);
  }
}

async function loop() {
  const began = Date.now();
  await tick();
  if (ui.stopped) return;
  ui.timer = setTimeout(loop, Math.max(250, REFRESH_MS - (Date.now() - began)));
}

function start() {
  clearTimeout(ui.timer);
  if (ui.token) $("app").hidden = false; // "Loading…" until the first answer
  loop();
}

function init() {
  ui.token = readToken();
  $("token-save").addEventListener("click", useToken);
  $("token-input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") useToken();
  });
  $("view-sandboxes").addEventListener("click", () => showView("sandboxes"));
  $("view-desktops").addEventListener("click", () => showView("desktops"));
  $("view-tasks").addEventListener("click", () => {
    showView("tasks");
    refreshTasks().catch(() => {});
  });
  $("reject-cancel").addEventListener("click", () => $("reject").close());
  $("reject-ok").addEventListener("click", confirmReject);
  $("reject-reason").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") confirmReject();
  });
  $("reject").addEventListener("close", () => {
    ui.rejecting = null;
  });
  for (const button of document.querySelectorAll("#detail .actions button")) {
    button.addEventListener("click", () => act(button.dataset.action));
  }
  $("confirm-cancel").addEventListener("click", () => $("confirm").close());
  $("confirm-ok").addEventListener("click", confirmDelete);
  window.addEventListener("hashchange", () => {
    const token = readToken();
    if (token && token !== ui.token) {
      ui.token = token;
      ui.stopped = false;
      start();
    }
  });
  api("GET", "/daemon").then((info) => {
    $("status").title = `aiva ${info.version}, daemon pid ${info.pid}`;
  }).catch(() => {});
  start();
}

document.addEventListener("DOMContentLoaded", init);
