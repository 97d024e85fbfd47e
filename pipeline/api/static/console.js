// OmniZip-Stream web console: plain JavaScript, no library, no CDN. Every API call carries
// "Authorization: Bearer <key>" with the key entered once and kept in localStorage; errors are
// shown as the API words them (error.message). Pictures are fetched with the key too and shown
// from blob: URLs (an <img src> cannot send a header).
"use strict";

const KEY_NAME = "omnizip.apiKey";
const POLL_MS = 2000;
const CHART_WINDOWS = 90;
const $ = (id) => document.getElementById(id);
const state = { key: localStorage.getItem(KEY_NAME) || "", streams: [], selected: null, windows: [],
                after: -1, shown: null, pictures: {}, errorFrom: null, timer: null };

class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

function url(path) { return new URL(path, document.baseURI); }

function api(path, opts = {}) {
  const headers = {};
  if (state.key) headers["Authorization"] = "Bearer " + state.key;
  let body;
  if (opts.json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(opts.json); }
  return fetch(url(path), { method: opts.method || "GET", headers, body, cache: "no-store" });
}

async function errorOf(resp) {
  try {
    const b = await resp.json();
    if (b && b.error && b.error.message) return b.error.message;
  } catch (e) { /* not JSON */ }
  return `HTTP ${resp.status} ${resp.statusText}`;
}

async function getJSON(path, opts) {
  const r = await api(path, opts);
  if (!r.ok) throw new ApiError(await errorOf(r), r.status);
  return r.json();
}

function showError(message, from = "action") {
  // an error of the polling loop goes away when polling works again; one of an action stays
  // until the next action
  state.errorFrom = message ? from : null;
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function fmtPct(x) { return (100 * x).toFixed(1) + "%"; }

function keptShare(s) {
  const t = s.tokens || {};
  const a = t.audio || { in: 0, kept: 0 }, v = t.video || { in: 0, kept: 0 };
  const tin = a.in + v.in;
  return tin ? (a.kept + v.kept) / tin : null;
}

// --- the streams list --------------------------------------------------------------------
function cell(text) { const td = document.createElement("td"); td.textContent = text; return td; }

function renderStreams() {
  const body = $("streams").querySelector("tbody");
  body.replaceChildren();
  for (const s of state.streams) {
    const tr = document.createElement("tr");
    tr.dataset.id = s.id;
    if (s.id === state.selected) tr.classList.add("selected");
    const share = keptShare(s);
    tr.append(cell(s.name || s.id), cell(s.status), cell(s.lag_s.toFixed(2) + " s"),
              cell(share === null ? "-" : fmtPct(share)), cell(String(s.windows_total)),
              cell(String(s.context_tokens)));
    tr.addEventListener("click", () => select(s.id));
    body.append(tr);
  }
  $("streams-empty").hidden = state.streams.length > 0;
}

async function refreshStreams() {
  const data = await getJSON("v1/streams");
  state.streams = data.streams;
  renderStreams();
}

// --- one stream --------------------------------------------------------------------------
function select(id) {
  if (state.selected !== id) {
    state.selected = id;
    state.windows = [];
    state.after = -1;
    state.shown = null;
    $("answer").textContent = "";
    $("answer-stats").textContent = "";
  }
  $("detail").hidden = false;
  renderStreams();
  refreshDetail().catch((e) => showError(e.message));
}

async function refreshDetail() {
  const id = state.selected;
  if (!id) return;
  const s = await getJSON(`v1/streams/${encodeURIComponent(id)}`);
  if (id !== state.selected) return;
  $("detail-title").textContent = s.name || s.id;
  $("detail-status").textContent = s.status;
  const share = keptShare(s);
  $("detail-stats").textContent = `source ${s.source} | lag ${s.lag_s.toFixed(2)} s | media ${s.media_s.toFixed(1)} s`
    + ` | windows ${s.windows_total} (${s.windows} in context, ${s.dropped} dropped)`
    + (share === null ? "" : ` | kept ${fmtPct(share)} of tokens`) + (s.error ? ` | error: ${s.error}` : "");
  const budget = (s.settings && s.settings.context_tokens) || 0;
  $("budget-fill").style.width = budget ? Math.min(100, 100 * s.context_tokens / budget) + "%" : "0";
  $("budget-text").textContent = `${s.context_tokens} / ${budget || "?"} tokens`;
  const q = state.after < 0 ? `tail=${CHART_WINDOWS}` : `after=${state.after}&limit=200`;
  const page = await getJSON(`v1/streams/${encodeURIComponent(id)}/windows?${q}`);
  if (id !== state.selected) return;
  state.windows = state.windows.concat(page.windows).slice(-CHART_WINDOWS);
  if (page.windows.length) state.after = page.next_after;
  drawChart();
  const last = state.windows[state.windows.length - 1];
  if (last && last.index !== state.shown) await showWindow(id, last);
}

async function picture(path, img) {
  const r = await api(path);
  if (!r.ok) {
    if (r.status === 404) return false;  // not stored yet: keep the previous picture
    throw new ApiError(await errorOf(r), r.status);
  }
  const blobUrl = URL.createObjectURL(await r.blob());
  if (state.pictures[img.id]) URL.revokeObjectURL(state.pictures[img.id]);
  state.pictures[img.id] = blobUrl;
  img.src = blobUrl;
  return true;
}

async function showWindow(id, w) {
  const base = `v1/streams/${encodeURIComponent(id)}/windows/${w.index}`;
  const ok = await picture(`${base}/frames.png`, $("frames-img"));
  await picture(`${base}/audio.png`, $("audio-img"));
  if (!ok) return;
  state.shown = w.index;
  const flags = Object.entries(w.flags).filter(([, v]) => v).map(([k]) => k);
  $("window-caption").textContent = `#${w.index} [${w.start.toFixed(1)}-${w.end.toFixed(1)} s]`
    + ` video ${w.video.kept}/${w.video.in}, audio ${w.audio.kept}/${w.audio.in}`
    + (flags.length ? ` (${flags.join(", ")})` : "");
}

function drawChart() {
  const c = $("chart"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  const ws = state.windows;
  if (!ws.length) return;
  const top = Math.max(1, ...ws.map((w) => w.audio.in + w.video.in));
  const bw = c.width / CHART_WINDOWS, h = c.height - 14;
  const css = getComputedStyle(document.documentElement);
  ws.forEach((w, i) => {
    const x = i * bw, y = (n) => h - (n / top) * (h - 4);
    g.fillStyle = "#3a3f4c";
    g.fillRect(x, y(w.audio.in + w.video.in), bw - 1, h - y(w.audio.in + w.video.in));
    g.fillStyle = css.getPropertyValue("--accent").trim() || "#28dc82";
    g.fillRect(x, y(w.video.kept), bw - 1, h - y(w.video.kept));
    g.fillStyle = css.getPropertyValue("--audio").trim() || "#ffaa28";
    g.fillRect(x, y(w.video.kept + w.audio.kept), bw - 1, y(w.video.kept) - y(w.video.kept + w.audio.kept));
  });
  g.fillStyle = "#8d93a3";
  g.font = "11px system-ui, sans-serif";
  g.fillText(`windows ${ws[0].index}-${ws[ws.length - 1].index}, max ${top} tokens in`, 4, c.height - 2);
}

// --- asking: the answer streams in as Server-Sent Events ------------------------------------
function handleEvent(raw) {
  let event = "message", data = "";
  for (const line of raw.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).replace(/^ /, "");
  }
  if (!data) return;
  const body = JSON.parse(data);
  if (event === "token") $("answer").textContent += body.text;
  else if (event === "done") {
    $("answer-stats").textContent = `${body.completion_tokens} tokens (${body.finish_reason}), `
      + `from ${body.context_tokens} context tokens over ${body.windows} windows`;
  } else if (event === "error") showError(body.error ? body.error.message : data);
}

async function ask(question) {
  const id = state.selected;
  $("answer").textContent = "";
  $("answer-stats").textContent = "";
  const r = await api(`v1/streams/${encodeURIComponent(id)}/ask`,
                      { method: "POST", json: { question, max_tokens: 64, stream: true } });
  if (!r.ok) throw new ApiError(await errorOf(r), r.status);
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      handleEvent(buf.slice(0, i));
      buf = buf.slice(i + 2);
    }
  }
  if (buf.trim()) handleEvent(buf);
}

// --- adding a stream ----------------------------------------------------------------------
function describeProbe(p) {
  if (!p.ok) return `cannot open: ${p.error}`;
  const parts = [];
  if (p.video) parts.push(`video ${p.video.codec} ${p.video.width}x${p.video.height}` + (p.video.fps ? ` @ ${p.video.fps} fps` : ""));
  else parts.push("no video");
  if (p.audio) parts.push(`audio ${p.audio.codec} ${p.audio.sample_rate} Hz, ${p.audio.channels} ch`);
  else parts.push("no audio");
  return `ok (${p.format}${p.live ? ", live" : ""}): ${parts.join("; ")} [${p.elapsed_s.toFixed(2)} s]`;
}

async function probe() {
  const out = $("probe-result");
  out.className = "probe";
  out.textContent = "testing...";
  try {
    const p = await getJSON("v1/sources/probe", { method: "POST", json: { source: $("add-source").value } });
    out.textContent = describeProbe(p);
    out.classList.add(p.ok ? "ok" : "bad");
  } catch (e) {
    out.textContent = e.message;
    out.classList.add("bad");
    throw e;
  }
}

async function addStream() {
  const spec = { source: $("add-source").value, method: $("add-method").value };
  if ($("add-name").value.trim()) spec.name = $("add-name").value.trim();
  const s = await getJSON("v1/streams", { method: "POST", json: spec });
  $("add-source").value = "";
  $("add-name").value = "";
  $("probe-result").textContent = "";
  await refreshStreams();
  select(s.id);
}

async function deleteStream() {
  const id = state.selected;
  if (!id) return;
  await getJSON(`v1/streams/${encodeURIComponent(id)}`, { method: "DELETE" });
  state.selected = null;
  $("detail").hidden = true;
  await refreshStreams();
}

// --- wiring -------------------------------------------------------------------------------
function guarded(fn) {
  return (ev) => {
    if (ev) ev.preventDefault();
    showError("");
    Promise.resolve().then(fn).catch((e) => showError(e.message));
  };
}

async function tick() {
  try {
    await refreshStreams();
    await refreshDetail();
    if (state.errorFrom === "poll") showError("");
  } catch (e) {
    if (state.errorFrom !== "action") showError(e.message, "poll");
  } finally {
    state.timer = setTimeout(tick, POLL_MS);
  }
}

function keyState() {
  $("key-state").textContent = state.key ? "key set" : "no key";
  $("key").value = "";
}

document.addEventListener("DOMContentLoaded", () => {
  keyState();
  $("key-form").addEventListener("submit", guarded(async () => {
    state.key = $("key").value.trim();
    localStorage.setItem(KEY_NAME, state.key);
    keyState();
    clearTimeout(state.timer);
    showError("");
    await tick();
  }));
  $("key-forget").addEventListener("click", () => {
    state.key = "";
    localStorage.removeItem(KEY_NAME);
    keyState();
  });
  $("probe").addEventListener("click", guarded(probe));
  $("add-form").addEventListener("submit", guarded(addStream));
  $("delete").addEventListener("click", guarded(deleteStream));
  $("ask-form").addEventListener("submit", guarded(async () => {
    $("ask").disabled = true;
    try { await ask($("question").value); } finally { $("ask").disabled = false; }
  }));
  tick();
});
