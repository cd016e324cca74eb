// Shoal's dashboard. Plain JavaScript, no build step, nothing loaded from elsewhere.
//
// Data: one live stream, GET /shoal/v1/events (Server-Sent Events: a snapshot, then
// what changes), and the node's JSON API for actions (pairing, chat). Both are read
// with fetch(), not EventSource, so that a browser on the LAN can send its API key as
// `Authorization: Bearer` (EventSource cannot send headers; a key in the URL would end
// up in logs and history). The key is kept in sessionStorage, or localStorage when the
// user asks to be remembered, and only ever sent to this same origin.
//
// Everything shown comes from the network and is set as text (textContent), never as
// HTML: a peer may name itself `<script>`.
"use strict";

const EVENTS = "/shoal/v1/events";
const CHAT = "/v1/chat/completions";
const PAIR_ACTION = (node, action) =>
  `/shoal/v1/pairs/${encodeURIComponent(node)}/${encodeURIComponent(action)}`;
const KEY_SLOT = "shoal.api_key";
const STALE_MS = 45000; // three missed heartbeats (15 s): the stream is dead, reconnect
const MAX_ROWS = 60;

const state = {
  operator: false,
  node: null, // this node's status view
  load: null, // {in_flight, queued}: the latest, between status views
  peers: [],
  models: [],
  pairs: null, // operator only
  requests: new Map(), // id -> row, in arrival order
  pulls: new Map(),
  fresh: new Set(), // request ids to flash once
  receivedAt: 0, // when the peers view arrived (for "seen … ago")
  nodeAt: 0, // when this node's status arrived (for its uptime)
  served: 0,
};

// -- small helpers ---------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "style") el.style.cssText = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n >= 100 || i === 0 ? n.toFixed(0) : n.toFixed(1)} ${units[i]}`;
}

function duration(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function ms(v) {
  if (v === null || v === undefined) return "–";
  return v < 1000 ? `${v.toFixed(v < 10 ? 1 : 0)} ms` : `${(v / 1000).toFixed(2)} s`;
}

function clock(epochS) {
  return new Date(epochS * 1000).toLocaleTimeString([], { hour12: false });
}

// "http://10.0.0.2:11450" -> "10.0.0.2:11450"; a wildcard bind says so.
function hostPort(url) {
  if (!url) return "";
  const bare = url.replace(/^[a-z]+:\/\//, "").replace(/\/.*$/, "");
  return bare.replace(/^(0\.0\.0\.0|\[::\]):/, "all addresses :");
}

function sleep(msec) { return new Promise((resolve) => setTimeout(resolve, msec)); }

let toastTimer = 0;
function toast(text) {
  const el = $("toast");
  el.textContent = text;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.hidden = true; }, 4000);
}

// -- the API key ------------------------------------------------------------------------

function storedKey() {
  return sessionStorage.getItem(KEY_SLOT) || localStorage.getItem(KEY_SLOT) || "";
}

function authHeaders(extra) {
  const key = storedKey();
  return { ...(key ? { Authorization: `Bearer ${key}` } : {}), ...(extra || {}) };
}

let keyPrompt = null; // one dialog at a time, however many requests were refused
function askForKey(message) {
  if (keyPrompt) return keyPrompt;
  keyPrompt = new Promise((resolve) => {
    const dialog = $("key-dialog");
    const input = $("key-input");
    const error = $("key-error");
    error.hidden = !message;
    error.textContent = message || "";
    input.value = "";
    dialog.hidden = false;
    setConnection("locked", "API key needed");
    input.focus();
    const done = () => {
      const key = input.value.trim();
      if (!key) { input.focus(); return; }
      sessionStorage.removeItem(KEY_SLOT);
      localStorage.removeItem(KEY_SLOT);
      ($("key-remember").checked ? localStorage : sessionStorage).setItem(KEY_SLOT, key);
      dialog.hidden = true;
      $("key-save").removeEventListener("click", done);
      input.removeEventListener("keydown", onKey);
      $("forget-key").hidden = false;
      keyPrompt = null;
      resolve();
    };
    const onKey = (event) => { if (event.key === "Enter") done(); };
    $("key-save").addEventListener("click", done);
    input.addEventListener("keydown", onKey);
  });
  return keyPrompt;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && (body.error.message || body.error)) || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

// fetch() with the key; a 401 asks for a key and tries again.
async function api(path, options) {
  for (;;) {
    const response = await fetch(path, {
      ...options,
      headers: authHeaders(options && options.headers),
      cache: "no-store",
    });
    if (response.status !== 401) return response;
    const message = storedKey() ? await errorMessage(response) : "";
    await askForKey(message);
  }
}

// -- the live stream ----------------------------------------------------------------------

function setConnection(kind, text) {
  const pill = $("conn");
  pill.dataset.state = kind;
  pill.lastElementChild.textContent = text;
}

async function follow() {
  let backoff = 1000;
  for (;;) {
    const abort = new AbortController();
    let watchdog = 0;
    const feed = () => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => abort.abort(), STALE_MS);
    };
    try {
      const response = await api(EVENTS, { signal: abort.signal });
      if (!response.ok) throw new Error(await errorMessage(response));
      setConnection("live", "live");
      backoff = 1000;
      feed();
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        feed();
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          frame(block);
        }
      }
    } catch (error) {
      if (error && error.name !== "AbortError") console.warn("event stream:", error);
    } finally {
      clearTimeout(watchdog);
    }
    setConnection("reconnecting", "reconnecting");
    await sleep(backoff);
    backoff = Math.min(backoff * 2, 10000);
  }
}

function frame(block) {
  let kind = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue; // a comment: the heartbeat
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") kind = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return;
  let document_;
  try { document_ = JSON.parse(data.join("\n")); } catch { return; }
  apply(kind, document_);
}

function apply(kind, doc) {
  switch (kind) {
    case "snapshot":
      state.operator = doc.operator;
      state.node = doc.node;
      state.nodeAt = Date.now();
      state.load = null;
      state.peers = doc.peers;
      state.receivedAt = Date.now();
      state.models = doc.models;
      state.pairs = doc.pairs;
      state.requests = new Map(doc.requests.map((r) => [r.id, r]));
      state.pulls = new Map(doc.pulls.map((p) => [p.id, p]));
      state.fresh.clear();
      break;
    case "node": state.node = doc; state.nodeAt = Date.now(); state.load = null; break;
    case "peers": state.peers = doc; state.receivedAt = Date.now(); break;
    case "models": state.models = doc; break;
    case "pairs": state.pairs = doc; break;
    case "load": state.load = doc; break;
    case "request":
      if (!state.requests.has(doc.id)) state.fresh.add(doc.id);
      state.requests.delete(doc.id);
      state.requests.set(doc.id, doc);
      while (state.requests.size > MAX_ROWS) state.requests.delete(state.requests.keys().next().value);
      break;
    case "pull": state.pulls.set(doc.id, doc); break;
    case "bye": setConnection("reconnecting", "node stopping"); return;
    default: return;
  }
  schedule();
}

let scheduled = false;
function schedule() {
  if (scheduled) return;
  scheduled = true;
  requestAnimationFrame(() => { scheduled = false; render(); });
}

// -- the cluster, as the page draws it -----------------------------------------------------

// Every node, this one first: {name, id, health, trust, address, hardware, load, models}.
function nodes() {
  const list = [];
  const pairs = new Map(((state.pairs && state.pairs.nodes) || []).map((n) => [n.node_id, n]));
  if (state.node) {
    const self = state.node;
    const models = new Map();
    for (const backend of self.backends) {
      for (const m of backend.models) {
        const seen = models.get(m.id);
        models.set(m.id, { id: m.id, loaded: (seen && seen.loaded) || m.loaded });
      }
    }
    const healthy = self.backends.some((b) => b.health === "healthy");
    const inFlight = state.load ? state.load.in_flight : self.local_in_flight;
    list.push({
      self: true, name: self.name, id: self.node_id, short: self.short_id,
      health: healthy || !self.backends.length ? "healthy" : "degraded",
      note: healthy || !self.backends.length ? "" : "no backend is healthy",
      trust: "this node", address: hostPort(self.url),
      hardware: self.hardware, version: self.version, uptime: self.uptime_s + (Date.now() - state.nodeAt) / 1000,
      load: { in_flight: inFlight, queued: state.load ? state.load.queued : 0,
              capacity: self.load && self.load.capacity },
      models: [...models.values()].sort((a, b) => a.id.localeCompare(b.id)),
      backends: self.backends,
    });
  }
  const elapsed = (Date.now() - state.receivedAt) / 1000;
  const peers = [...state.peers].sort((a, b) => (a.name || a.short_id).localeCompare(b.name || b.short_id));
  for (const p of peers) {
    const pair = pairs.get(p.node_id);
    list.push({
      self: false, name: p.name || p.short_id, id: p.node_id, short: p.short_id,
      health: p.health, state: p.state, trust: pair ? pair.state : null,
      address: hostPort(p.address), hardware: p.hardware, version: p.version,
      uptime: p.uptime_s === null ? null : p.uptime_s + elapsed,
      seen: p.last_seen_s_ago === null ? null : p.last_seen_s_ago + elapsed,
      load: p.load, models: p.models || [],
    });
  }
  return list;
}

function render() {
  renderTop();
  renderPairs();
  renderNodes();
  renderModels();
  renderRequests();
  renderPulls();
  renderChatModels();
}

function renderTop() {
  const node = state.node;
  if (!node) return;
  $("here-name").textContent = node.name;
  $("here-id").textContent = node.short_id;
  const mode = $("mode");
  mode.hidden = false;
  mode.textContent = `${node.cluster_mode} mode`;
  mode.className = `badge ${node.cluster_mode === "open" ? "warn" : "accent"}`;
  const all = nodes();
  const healthy = all.filter((n) => n.health === "healthy").length;
  $("stat-nodes").textContent = `${healthy}/${all.length}`;
  $("stat-models").textContent = String(state.models.length);
  const inFlight = all.reduce((sum, n) => sum + ((n.load && n.load.in_flight) || 0), 0);
  $("stat-flight").textContent = String(inFlight);
  $("stat-requests").textContent = String(state.requests.size);
  $("foot-version").textContent = `Shoal ${node.version} · ${node.name} (${node.short_id}) · up ${duration(node.uptime_s + (Date.now() - state.nodeAt) / 1000)}`;
  $("foot-note").textContent = state.operator
    ? "You are this node's operator (this machine): pairing and pulls are yours to manage."
    : "Viewing from the network: pairing and pulls are managed on the node's own machine.";
}

function renderPairs() {
  const box = $("pairs");
  const pending = ((state.pairs && state.pairs.nodes) || []).filter((n) => n.state === "pending");
  box.hidden = !pending.length;
  box.replaceChildren(...pending.map((n) => {
    const code = n.code ? `${n.code.slice(0, 3)} ${n.code.slice(3)}` : "––– –––";
    return h("div", { class: "pair", dataset: { pair: n.name || n.short_id } },
      h("div", { class: "pair-text" },
        h("strong", {}, n.name || n.short_id), " wants to pair",
        h("p", {}, `${n.address || "address unknown"} · ${n.short_id} · accept only if its own screen shows the same code`)),
      h("span", { class: "code", title: "confirmation code", dataset: { code: n.code || "" } }, code),
      h("div", { class: "pair-actions" },
        h("button", { class: "primary", type: "button", onclick: () => pairAction(n, "accept") }, "Accept"),
        h("button", { class: "danger", type: "button", onclick: () => pairAction(n, "decline") }, "Decline")));
  }));
}

async function pairAction(node, action) {
  const response = await api(PAIR_ACTION(node.short_id, action), { method: "POST" });
  if (!response.ok) { toast(`${action} failed: ${await errorMessage(response)}`); return; }
  toast(action === "accept" ? `Accepted ${node.name || node.short_id}` : `Declined ${node.name || node.short_id}`);
}

function hardwareLine(hw) {
  if (!hw) return [];
  const parts = [`${hw.cores} cores`, `${bytes(hw.ram_bytes)} RAM`];
  if (hw.gpu) parts.push(`${hw.gpu}${hw.vram_bytes ? ` ${bytes(hw.vram_bytes)}` : ""}`);
  return parts;
}

function healthText(n) {
  if (n.self) return n.note || "healthy";
  if (n.state === "removed") return "unreachable";
  if (n.state === "joining") return "joining";
  return n.health;
}

function renderNodes() {
  const all = nodes();
  const down = all.filter((n) => n.health !== "healthy").length;
  $("nodes-summary").textContent = `${all.length} node${all.length === 1 ? "" : "s"}${down ? ` · ${down} not healthy` : ""}`;
  const box = $("nodes");
  if (!all.length) { box.replaceChildren(h("p", { class: "empty" }, "Waiting for the node…")); return; }
  box.replaceChildren(...all.map((n) => {
    const load = n.load || {};
    const capacity = Math.max(load.capacity || 0, load.in_flight || 0, 1);
    const share = Math.min(100, Math.round(((load.in_flight || 0) / capacity) * 100));
    const trustBadge = n.self ? h("span", { class: "badge accent" }, "this node")
      : n.trust ? h("span", { class: `badge ${n.trust === "paired" ? "" : "warn"}` }, n.trust) : null;
    const healthBadge = h("span", {
      class: `badge ${n.health === "healthy" ? "ok" : n.health === "degraded" ? "warn" : "bad"}`,
      dataset: { role: "health" },
    }, healthText(n));
    return h("article", { class: "node", dataset: { node: n.name, health: n.health, self: n.self ? "1" : "0" } },
      h("div", { class: "node-head" },
        h("span", { class: `health ${n.health}`, title: n.health }),
        h("span", { class: "node-name", title: n.name }, n.name),
        h("span", { class: "badges" }, trustBadge, healthBadge)),
      h("div", { class: "node-meta" },
        h("span", { class: "mono" }, n.short),
        n.address ? h("span", { class: "mono" }, n.address) : null,
        ...hardwareLine(n.hardware).map((t) => h("span", {}, t))),
      h("div", { class: "load" },
        h("span", {}, "load"),
        h("div", { class: `bar ${share >= 100 ? "hot" : ""}` }, h("i", { style: `width:${share}%` })),
        h("span", {}, `${load.in_flight || 0}${load.capacity ? `/${load.capacity}` : ""} in flight${load.queued ? `, ${load.queued} queued` : ""}`)),
      n.models.length
        ? h("div", { class: "chips" }, n.models.map((m) =>
          h("span", { class: "chip", title: `${m.id} (${m.loaded ? "loaded" : "on disk"})`, dataset: { model: m.id } },
            h("i", { class: `dot ${m.loaded ? "loaded" : "disk"}` }), h("span", {}, m.id))))
        : h("div", { class: "faint" }, "no models"),
      h("div", { class: "node-foot" },
        n.version ? h("span", {}, `v${n.version}`) : null,
        n.uptime !== null && n.uptime !== undefined ? h("span", {}, `up ${duration(n.uptime)}`) : null,
        n.seen !== null && n.seen !== undefined ? h("span", {}, `seen ${n.seen < 10 ? n.seen.toFixed(1) : Math.round(n.seen)} s ago`) : null));
  }));
}

function renderModels() {
  const where = new Map(); // model -> [{node, loaded}]
  for (const n of nodes()) {
    if (!n.self && n.health === "unreachable") continue;
    for (const m of n.models) {
      if (!where.has(m.id)) where.set(m.id, []);
      where.get(m.id).push({ node: n.name, loaded: m.loaded });
    }
  }
  const body = $("models");
  if (!state.models.length) {
    body.replaceChildren(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No model in the cluster yet.")));
    return;
  }
  body.replaceChildren(...state.models.map((m) => h("tr", { dataset: { model: m.id } },
    h("td", { class: "model-name" }, m.id),
    h("td", { class: "num" }, m.size_bytes ? bytes(m.size_bytes) : "–"),
    h("td", { class: "col-quant" }, m.quantization || "–"),
    h("td", { class: "num col-ctx" }, m.context_length ? m.context_length.toLocaleString() : "–"),
    h("td", {}, h("div", { class: "chips" }, (where.get(m.id) || m.nodes.map((node) => ({ node, loaded: m.loaded })))
      .map((w) => h("span", { class: "chip", title: w.loaded ? "loaded" : "on disk" },
        h("i", { class: `dot ${w.loaded ? "loaded" : "disk"}` }), h("span", {}, w.node))))))));
}

function renderRequests() {
  const rows = [...state.requests.values()].reverse();
  const body = $("requests");
  if (!rows.length) {
    body.replaceChildren(h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No request yet. Send one from the chat box, or any OpenAI client.")));
    return;
  }
  body.replaceChildren(...rows.map((r) => {
    const ok = r.status !== null && r.status < 400;
    const tr = h("tr", { class: state.fresh.has(r.id) ? "fresh" : "", dataset: { request: r.id, model: r.model, node: r.node || "", state: r.state } },
      h("td", { class: "mono col-time" }, clock(r.at)),
      h("td", { class: "model-name" }, r.model),
      h("td", {}, r.node || "–", r.backend ? h("span", { class: "faint backend" }, ` · ${r.backend}`) : null),
      h("td", { class: "col-route" }, r.route ? h("span", { class: `route ${r.route}` }, r.route) : "–"),
      h("td", { class: "num" }, r.state === "running"
        ? h("span", { class: "spinner", title: "streaming" })
        : h("span", { class: ok ? "status-ok" : "status-err", title: r.outcome || "" }, String(r.status))),
      h("td", { class: "num col-first" }, ms(r.first_byte_ms)),
      h("td", { class: "num" }, ms(r.total_ms)));
    return tr;
  }));
  if (state.fresh.size) {
    const fresh = [...state.fresh];
    state.fresh.clear();
    requestAnimationFrame(() => requestAnimationFrame(() => {
      for (const id of fresh) {
        const row = body.querySelector(`tr[data-request="${id}"]`);
        if (row) row.classList.remove("fresh");
      }
    }));
  }
}

function renderPulls() {
  const box = $("pulls");
  const pulls = [...state.pulls.values()].reverse();
  if (!pulls.length) {
    box.replaceChildren(state.operator
      ? h("p", { class: "empty" }, "No pull running. ", h("code", {}, "shoal models pull NAME"),
        " fetches a model from the LAN's peers first, then the Hub; its progress shows here.")
      : h("p", { class: "empty" }, "No pull running on this node."));
    return;
  }
  box.replaceChildren(...pulls.map((p) => {
    const share = p.total ? Math.min(100, (p.completed / p.total) * 100) : p.state === "done" ? 100 : 0;
    const eta = p.rate_bps && p.total ? (p.total - p.completed) / p.rate_bps : null;
    const figures = p.state === "done" ? `done · ${bytes(p.total)}${p.seconds ? ` in ${p.seconds.toFixed(1)} s` : ""}`
      : p.state === "failed" ? `failed${p.code ? ` (${p.code})` : ""}${p.message ? `: ${p.message}` : ""}`
      : `${share.toFixed(0)}% · ${bytes(p.completed)} of ${bytes(p.total)}${p.rate_bps ? ` · ${bytes(p.rate_bps)}/s` : ""}${eta !== null ? ` · ${duration(eta)} left` : ""}`;
    return h("div", { class: `pull ${p.state}`, dataset: { pull: p.model } },
      h("div", {}, h("div", { class: "model-name mono" }, p.model), p.file ? h("div", { class: "faint mono" }, p.file) : null),
      h("div", { class: "bar" }, h("i", { style: `width:${share.toFixed(1)}%` })),
      h("div", { class: "pull-figures" }, figures));
  }));
}

// -- the chat box ----------------------------------------------------------------------------

const chat = { history: [], running: null };

function renderChatModels() {
  const select = $("chat-model");
  const chatModels = state.models.filter((m) => !m.operations || m.operations.includes("chat/completions"));
  const ids = chatModels.map((m) => m.id);
  const current = [...select.options].map((o) => o.value);
  if (ids.join("\n") === current.join("\n")) return;
  const chosen = select.value;
  select.replaceChildren(...chatModels.map((m) =>
    h("option", { value: m.id }, `${m.id}${m.loaded ? "" : " (loads on first use)"} — ${m.nodes.join(", ")}`)));
  if (ids.includes(chosen)) select.value = chosen;
}

function chatLine(cls, text) {
  const log = $("chat-log");
  const empty = log.querySelector(".empty");
  if (empty) empty.remove();
  const el = h("div", { class: `msg ${cls}` }, text);
  log.append(el);
  log.scrollTop = log.scrollHeight;
  return el;
}

async function send() {
  if (chat.running) { chat.running.abort(); return; }
  const input = $("chat-input");
  const text = input.value.trim();
  const model = $("chat-model").value;
  if (!text || !model) return;
  input.value = "";
  chat.history.push({ role: "user", content: text });
  chatLine("user", text);
  const bubble = chatLine("assistant streaming", "");
  const abort = new AbortController();
  chat.running = abort;
  $("chat-send").textContent = "Stop";
  const started = performance.now();
  let answer = "";
  let first = null;
  let usage = null;
  let servedBy = null;
  try {
    let response;
    for (let tries = 0; ; tries += 1) {
      response = await api(CHAT, {
        method: "POST",
        signal: abort.signal,
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ model, messages: chat.history, stream: true, max_tokens: 512,
                               stream_options: { include_usage: true } }),
      });
      if (response.status !== 503 || tries >= 20) break;
      // Loading the model, or its node is restarting: wait as the server says.
      const wait = Number(response.headers.get("Retry-After")) || 1;
      bubble.textContent = `${await errorMessage(response)} — retrying in ${wait} s…`;
      await sleep(wait * 1000);
      bubble.textContent = "";
    }
    if (!response.ok) throw new Error(await errorMessage(response));
    servedBy = response.headers.get("X-Shoal-Served-By");
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message || "the stream broke");
          if (chunk.usage) usage = chunk.usage;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            if (first === null) first = performance.now();
            answer += delta.content;
            bubble.textContent = answer;
            $("chat-log").scrollTop = $("chat-log").scrollHeight;
          }
        }
      }
    }
    chat.history.push({ role: "assistant", content: answer });
  } catch (error) {
    chat.history.pop(); // the question goes unanswered: do not send it again
    if (error.name === "AbortError") {
      if (answer) chat.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
    } else {
      chatLine("error", String(error.message || error));
    }
  } finally {
    bubble.classList.remove("streaming");
    if (!answer) bubble.remove();
    chat.running = null;
    $("chat-send").textContent = "Send";
  }
  if (answer) {
    const tokens = usage ? usage.completion_tokens : null;
    const parts = [model];
    if (servedBy) parts.push(`served by ${servedBy}`);
    if (first !== null) parts.push(`first token ${ms(first - started)}`);
    const decoding = first === null ? 0 : (performance.now() - first) / 1000;
    if (tokens) parts.push(`${tokens} tokens${tokens > 1 && decoding > 0 ? `, ${((tokens - 1) / decoding).toFixed(0)} tok/s` : ""}`);
    const meta = h("div", { class: "msg-meta left" }, parts.join(" · "));
    $("chat-log").append(meta);
    $("chat-log").scrollTop = $("chat-log").scrollHeight;
  }
}

// -- start ------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("chat-send").addEventListener("click", send);
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      if (!chat.running) send();
    }
  });
  $("chat-clear").addEventListener("click", () => {
    if (chat.running) chat.running.abort();
    chat.history = [];
    $("chat-log").replaceChildren(h("p", { class: "empty" }, "Ask any model of the cluster. The answer streams from the node that serves it."));
  });
  $("forget-key").hidden = !storedKey();
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_SLOT);
    localStorage.removeItem(KEY_SLOT);
    location.reload();
  });
  setInterval(() => { if (state.node) { renderNodes(); renderTop(); } }, 2000); // ages
  render();
  follow();
});
