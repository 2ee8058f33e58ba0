// framegate traffic console: the live connections of the admin API, and one connection's
// handshake and captured messages. Plain JS, no framework, no build step; served by the admin
// listener at /console/console.js (embedded in the binary).
//
// Data only ever reaches the DOM through textContent and attributes, never innerHTML: payloads,
// headers and tags come from clients and upstreams.
//
// Endpoints used (docs/operations.md, "Admin API"; docs/console.md):
//   GET    /admin/connections                         polled every second
//   GET    /admin/connections/{id}                    request, capture mode
//   GET    /admin/connections/{id}/capture            response, entries, lost, closed
//   GET    /admin/connections/{id}/capture/stream     server-sent events: entry, lost, closed
//   POST   /admin/connections/{id}/capture?mode=      capture on or off
//   POST   /admin/connections/{id}/send?to=           a message to either side
//   DELETE /admin/connections/{id}?code=&reason=      close
"use strict";

(() => {
  const POLL_MS = 1000;
  // Closed connections' rows kept while the pointer rests on the list (see renderList).
  const MAX_GONE = 200;
  const LIST_LIMIT = 1000;
  // The page keeps at most this many entries of one connection (the gateway keeps fewer).
  const MAX_ENTRIES = 2000;
  const RETRY_MS = [1000, 2000, 5000];
  // Hex dumps of binary payloads stop here (the download has everything captured).
  const MAX_HEX_BYTES = 4096;

  const $ = (id) => document.getElementById(id);

  // ---- small DOM helpers (text only) ----

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("data-") || k === "title" || k === "role") node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) {
      if (c === undefined || c === null) continue;
      node.append(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return node;
  }

  // ---- status line ----

  let statusFrom = null;

  function setStatus(text, kind, from) {
    const s = $("status");
    s.textContent = text;
    s.className = `status ${kind || ""}`;
    s.dataset.kind = kind || "";
    statusFrom = from || null;
  }

  function clearStatus(from) {
    if (statusFrom === from) setStatus("", "", null);
  }

  // ---- the admin API ----

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(method, path, body, type) {
    const init = { method, credentials: "same-origin", headers: {} };
    if (body !== undefined) {
      init.body = body;
      init.headers["Content-Type"] = type;
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, `cannot reach the admin listener (${e.message})`);
    }
    const text = await resp.text();
    let json = null;
    try {
      json = text ? JSON.parse(text) : null;
    } catch (_) {
      json = null;
    }
    if (!resp.ok) {
      const why = json && typeof json.error === "string" ? json.error : text.slice(0, 200);
      throw new ApiError(resp.status, `${resp.status}: ${why || resp.statusText}`);
    }
    return json;
  }

  const connPath = (id) => `/admin/connections/${encodeURIComponent(id)}`;

  // ---- formatting ----

  function formatAge(ms) {
    if (!(ms >= 0)) return "";
    const s = Math.floor(ms / 1000);
    if (s < 60) return `${s}s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${s % 60}s`;
    const h = Math.floor(m / 60);
    if (h < 24) return `${h}h ${m % 60}m`;
    return `${Math.floor(h / 24)}d ${h % 24}h`;
  }

  function ageOf(conn) {
    if (typeof conn.age_ms === "number") return conn.age_ms;
    const opened = Date.parse(conn.opened_at);
    return Number.isNaN(opened) ? NaN : Date.now() - opened;
  }

  function formatTime(ms) {
    const d = new Date(ms);
    if (Number.isNaN(d.getTime())) return "";
    const p = (n, w) => String(n).padStart(w, "0");
    return `${p(d.getHours(), 2)}:${p(d.getMinutes(), 2)}:${p(d.getSeconds(), 2)}.${p(d.getMilliseconds(), 3)}`;
  }

  function isoTime(ms) {
    const d = new Date(ms);
    return Number.isNaN(d.getTime()) ? "" : d.toISOString();
  }

  function formatSize(n) {
    if (typeof n !== "number") return "";
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
    return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  }

  function formatMicros(us) {
    if (typeof us !== "number") return "";
    if (us < 1000) return `${us} µs`;
    return `${(us / 1000).toFixed(us < 10000 ? 2 : 1)} ms`;
  }

  const DIRECTIONS = {
    client_to_upstream: { arrow: "→", words: "client → upstream", natural: "client" },
    upstream_to_client: { arrow: "←", words: "upstream → client", natural: "upstream" },
  };

  function tagText(tags) {
    return Object.entries(tags || {}).map(([k, v]) => `${k}:${v}`);
  }

  // ---- payloads ----

  function base64Bytes(b64) {
    try {
      const bin = atob(b64);
      const out = new Uint8Array(bin.length);
      for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
      return out;
    } catch (_) {
      return null;
    }
  }

  function hexDump(bytes) {
    const lines = [];
    const n = Math.min(bytes.length, MAX_HEX_BYTES);
    for (let off = 0; off < n; off += 16) {
      const row = bytes.subarray(off, Math.min(off + 16, n));
      const hex = Array.from(row, (b) => b.toString(16).padStart(2, "0")).join(" ");
      const ascii = Array.from(row, (b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : ".")).join("");
      lines.push(`${off.toString(16).padStart(6, "0")}  ${hex.padEnd(47)}  ${ascii}`);
    }
    if (bytes.length > n) lines.push(`… ${bytes.length - n} more bytes`);
    return lines.join("\n");
  }

  // `p`: {payload, encoding, truncated, size} of an entry or of its `after`.
  function payloadView(p, size) {
    if (p.payload === undefined || p.payload === null) {
      return el("span", { class: "muted", "data-testid": "no-payload", text: "no payload (metadata capture)" });
    }
    const box = el("div", { class: "payload" });
    let kind;
    let text;
    if (p.encoding === "base64") {
      const bytes = base64Bytes(p.payload);
      kind = "hex";
      text = bytes ? hexDump(bytes) : "(undecodable base64)";
    } else {
      text = String(p.payload);
      kind = "text";
      const t = text.trimStart();
      if (!p.truncated && (t.startsWith("{") || t.startsWith("["))) {
        try {
          text = JSON.stringify(JSON.parse(text), null, 2);
          kind = "json";
        } catch (_) {
          kind = "text";
        }
      }
    }
    box.dataset.kind = kind;
    box.append(el("pre", { class: `payload-${kind}`, "data-testid": "payload-text", text }));
    if (p.truncated) {
      box.append(el("span", { class: "truncated", "data-testid": "truncated", text: `truncated (message is ${formatSize(size)})` }));
    }
    return box;
  }

  // ---- connection list ----

  // gone: connections that ended while the pointer was over the list (id -> last data).
  const list = { rows: new Map(), conns: new Map(), gone: new Map(), filter: "", pointerIn: false };

  function connMatches(c, f) {
    if (!f) return true;
    const hay = [String(c.id), c.route, c.client, c.upstream, ...tagText(c.tags)];
    return hay.some((s) => typeof s === "string" && s.toLowerCase().includes(f));
  }

  function connRow(c) {
    const tr = el("tr", { "data-testid": "conn-row", "data-id": String(c.id), tabIndex: 0 });
    for (const name of ["id", "route", "client", "upstream", "age", "msgs", "tags"]) {
      tr.append(el("td", { class: `c-${name}`, "data-testid": `conn-${name}` }));
    }
    return tr;
  }

  function fillConnRow(tr, c, gone) {
    tr.conn = c;
    const cells = tr.children;
    const m = c.messages || {};
    const set = (i, text) => {
      if (cells[i].textContent !== text) cells[i].textContent = text;
    };
    set(0, String(c.id));
    set(1, c.route || "");
    set(2, c.client || "");
    set(3, c.upstream || "");
    set(4, gone ? "closed" : formatAge(ageOf(c)));
    set(5, `${m.client_to_upstream ?? 0} / ${m.upstream_to_client ?? 0}`);
    set(6, tagText(c.tags).join(" "));
    cells[3].title = c.upstream || "";
    tr.classList.toggle("selected", detail.id === c.id);
    tr.setAttribute("aria-selected", detail.id === c.id ? "true" : "false");
  }

  function renderList() {
    const body = $("conn-rows");
    const f = list.filter;
    let shown = 0;
    // A connection that ended leaves the list, and the rows below it move up. While the
    // pointer is over the list its row stays instead, marked closed, so that a click meant
    // for one connection cannot land on another; it goes when the pointer leaves (or when
    // MAX_GONE rows are kept already: a busy gateway's churn must not grow the page).
    for (const [id, tr] of list.rows) {
      if (list.conns.has(id)) {
        list.gone.delete(id);
      } else if (list.pointerIn && (list.gone.has(id) || list.gone.size < MAX_GONE)) {
        if (!list.gone.has(id)) list.gone.set(id, tr.conn);
      } else {
        list.gone.delete(id);
        tr.remove();
        list.rows.delete(id);
      }
    }
    let before = null;
    // Ascending ids, as the API lists them; rows are reused so a click never hits a stale one.
    const all = [...list.conns.values(), ...list.gone.values()].sort((a, b) => a.id - b.id);
    for (const c of all.reverse()) {
      let tr = list.rows.get(c.id);
      if (!tr) {
        tr = connRow(c);
        list.rows.set(c.id, tr);
      }
      const gone = list.gone.has(c.id);
      fillConnRow(tr, c, gone);
      tr.classList.toggle("gone", gone);
      tr.hidden = !connMatches(c, f);
      if (!tr.hidden && !gone) shown++;
      if (tr.nextSibling !== before || tr.parentNode !== body) body.insertBefore(tr, before);
      before = tr;
    }
    $("conn-count").textContent = f ? `(${shown} of ${list.conns.size})` : `(${list.conns.size})`;
    $("conn-empty").hidden = shown > 0;
    $("conn-empty").textContent = list.conns.size ? "No connection matches the filter." : "No open connections.";
  }

  async function poll() {
    try {
      const data = await api("GET", `/admin/connections?limit=${LIST_LIMIT}`);
      list.conns = new Map((data.connections || []).map((c) => [c.id, c]));
      clearStatus("poll");
      renderList();
      if (typeof data.matched === "number" && data.matched > list.conns.size) {
        $("conn-count").textContent += ` · first ${list.conns.size} of ${data.matched}`;
      }
      if (detail.id !== null) renderDetailState();
    } catch (e) {
      setStatus(`Listing connections failed: ${e.message}`, "error", "poll");
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  // ---- one connection ----

  const detail = {
    id: null,
    gen: 0, // bumped on every selection; late answers of an earlier one are ignored
    mode: null,
    entries: [],
    shown: 0, // entries[0..shown] have rows
    lastSeq: 0,
    lost: 0,
    closed: null,
    paused: false,
    source: null,
    retry: null,
    retries: 0,
    hasCapture: false,
  };

  function stopStream() {
    if (detail.source) detail.source.close();
    detail.source = null;
    clearTimeout(detail.retry);
    detail.retry = null;
  }

  async function select(id) {
    stopStream();
    const gen = ++detail.gen;
    Object.assign(detail, {
      id, mode: null, entries: [], shown: 0, lastSeq: 0, lost: 0, closed: null, retries: 0, hasCapture: false,
    });
    if (location.hash !== `#conn=${id}`) history.replaceState(null, "", `#conn=${id}`);
    $("detail").hidden = false;
    $("placeholder").hidden = true;
    $("d-id").textContent = `#${id}`;
    $("d-route").textContent = list.conns.get(id)?.route || "";
    $("msg-rows").replaceChildren();
    $("req-line").textContent = "";
    $("req-headers").replaceChildren();
    $("resp-line").textContent = "";
    $("resp-headers").replaceChildren();
    renderLost();
    renderClosed();
    renderPaused();
    renderList();
    try {
      const d = await api("GET", connPath(id));
      if (gen !== detail.gen) return;
      $("d-route").textContent = d.route || "";
      renderRequest(d.request);
      if (d.capture && d.capture.mode) detail.mode = d.capture.mode;
    } catch (e) {
      if (gen !== detail.gen) return;
      // 404: closed already; its capture may still be there.
      if (e.status !== 404) setStatus(`Connection ${id}: ${e.message}`, "error", "detail");
    }
    await loadCapture(gen);
  }

  // GET the capture: entries newer than the last one shown, response, lost, closed. Starts the
  // stream when the connection is still open.
  async function loadCapture(gen) {
    let cap;
    try {
      cap = await api("GET", `${connPath(detail.id)}/capture`);
    } catch (e) {
      if (gen !== detail.gen) return;
      if (e.status === 404) {
        detail.hasCapture = false;
        $("resp-line").textContent = "not recorded (no capture)";
        renderDetailState();
        renderEmptyMessages();
        return;
      }
      setStatus(`Capture of ${detail.id}: ${e.message}`, "error", "capture");
      scheduleRetry(gen);
      return;
    }
    if (gen !== detail.gen) return;
    clearStatus("capture");
    detail.hasCapture = true;
    detail.mode = cap.mode || detail.mode;
    if (cap.request) renderRequest(cap.request);
    renderResponse(cap.response);
    if (typeof cap.lost === "number" && cap.lost > detail.lost) detail.lost = cap.lost;
    // After a broken stream: entries the ring dropped meanwhile are lost too.
    const fresh = (cap.entries || []).filter((e) => e.seq > detail.lastSeq);
    if (detail.lastSeq > 0 && fresh.length && fresh[0].seq > detail.lastSeq + 1) {
      detail.lost += fresh[0].seq - detail.lastSeq - 1;
    }
    for (const entry of fresh) addEntry(entry);
    renderLost();
    if (cap.closed) setClosed(cap.closed);
    renderDetailState();
    renderEmptyMessages();
    if (!detail.closed) openStream(gen);
  }

  function openStream(gen) {
    stopStream();
    const es = new EventSource(`${connPath(detail.id)}/capture/stream?after=${detail.lastSeq}`);
    detail.source = es;
    const mine = () => gen === detail.gen && detail.source === es;
    es.addEventListener("open", () => {
      if (mine()) detail.retries = 0;
    });
    es.addEventListener("entry", (e) => {
      if (!mine()) return;
      const entry = parse(e.data);
      if (entry) addEntry(entry);
      renderEmptyMessages();
    });
    es.addEventListener("lost", (e) => {
      if (!mine()) return;
      const n = parse(e.data)?.lost;
      if (typeof n === "number") detail.lost += n;
      renderLost();
    });
    es.addEventListener("closed", (e) => {
      if (!mine()) return;
      setClosed(parse(e.data) || {});
      stopStream();
    });
    es.addEventListener("error", () => {
      if (!mine()) return;
      // EventSource would reconnect with its first URL; reconnect after the last entry seen,
      // through a fresh GET, which also learns whether the connection has closed meanwhile.
      stopStream();
      if (!detail.closed) scheduleRetry(gen);
    });
  }

  function scheduleRetry(gen) {
    const wait = RETRY_MS[Math.min(detail.retries, RETRY_MS.length - 1)];
    detail.retries++;
    clearTimeout(detail.retry);
    detail.retry = setTimeout(() => {
      if (gen === detail.gen) loadCapture(gen);
    }, wait);
  }

  function parse(text) {
    try {
      return JSON.parse(text);
    } catch (_) {
      return null;
    }
  }

  function headerRows(tbody, headers) {
    tbody.replaceChildren(
      ...(headers || []).map(([name, value]) =>
        el("tr", {}, el("th", { text: String(name) }), el("td", { text: String(value) })),
      ),
    );
  }

  function renderRequest(r) {
    if (!r) return;
    $("req-line").textContent = `${r.method || ""} ${r.target || ""}`;
    headerRows($("req-headers"), r.headers);
    if (r.headers_truncated) $("req-headers").append(el("tr", {}, el("td", { class: "muted", text: "(more headers not kept)" })));
  }

  function renderResponse(r) {
    if (!r) {
      $("resp-line").textContent = "not recorded";
      $("resp-headers").replaceChildren();
      return;
    }
    $("resp-line").textContent = `HTTP/1.1 ${r.status}`;
    headerRows($("resp-headers"), r.headers);
  }

  function renderDetailState() {
    const c = list.conns.get(detail.id);
    const parts = [];
    if (detail.closed) parts.push("closed");
    else if (c) parts.push(`open ${formatAge(ageOf(c))}`);
    else parts.push("no longer open");
    if (c) {
      const m = c.messages || {};
      parts.push(`${m.client_to_upstream ?? 0} → / ${m.upstream_to_client ?? 0} ←`);
    }
    parts.push(`capture ${detail.mode || (detail.hasCapture ? "?" : "off")}`);
    $("d-state").textContent = parts.join(" · ");
    const select = $("capture-mode");
    if (document.activeElement !== select && detail.mode) select.value = detail.mode;
    const open = !!c && !detail.closed;
    select.disabled = !open;
    for (const b of $("send-form").elements) b.disabled = !open;
    for (const b of $("close-form").elements) b.disabled = !open;
  }

  function renderEmptyMessages() {
    const e = $("msg-empty");
    if (detail.entries.length) {
      e.hidden = true;
      return;
    }
    e.hidden = false;
    e.textContent = detail.hasCapture
      ? "No messages captured yet."
      : "Capture is off for this connection: choose metadata or payload above to record its messages.";
  }

  function renderLost() {
    const n = $("lost");
    n.hidden = detail.lost === 0;
    n.textContent = `lost ${detail.lost} entries (the console or the capture ring fell behind)`;
  }

  function setClosed(c) {
    detail.closed = c;
    renderClosed();
    renderDetailState();
  }

  function renderClosed() {
    const n = $("closed");
    const c = detail.closed;
    n.hidden = !c;
    if (!c) return;
    const who = c.by ? ` (by ${c.by})` : "";
    n.textContent = `closed ${c.code ?? ""} ${c.reason ?? ""}`.trimEnd() + who;
    n.dataset.code = c.code ?? "";
  }

  // ---- entries ----

  function addEntry(entry) {
    if (typeof entry.seq === "number") {
      if (entry.seq <= detail.lastSeq) return;
      detail.lastSeq = entry.seq;
    }
    detail.entries.push(entry);
    if (detail.entries.length > MAX_ENTRIES) {
      detail.entries.shift();
      if (detail.shown > 0) {
        detail.shown--;
        $("msg-rows").firstElementChild?.remove();
      }
    }
    if (!detail.paused) flushEntries();
    else renderPaused();
  }

  function flushEntries() {
    const wrap = document.querySelector(".messages-wrap");
    const atBottom = wrap.scrollHeight - wrap.scrollTop - wrap.clientHeight < 40;
    const rows = [];
    for (; detail.shown < detail.entries.length; detail.shown++) rows.push(entryRow(detail.entries[detail.shown]));
    $("msg-rows").append(...rows);
    if (atBottom && rows.length) wrap.scrollTop = wrap.scrollHeight;
    renderPaused();
  }

  function entryRow(e) {
    const dir = DIRECTIONS[e.direction] || { arrow: "?", words: String(e.direction), natural: "" };
    const tr = el("tr", {
      "data-testid": "msg-row",
      "data-seq": String(e.seq),
      "data-direction": String(e.direction),
      "data-type": String(e.type),
      "data-decision": e.decision ? String(e.decision) : "",
      class: `dir-${e.direction === "client_to_upstream" ? "in" : "out"}`,
    });
    const from = e.from && e.from !== dir.natural ? el("span", { class: "from", text: e.from }) : null;
    let type = String(e.type);
    if (e.type === "close") type = `close ${e.code ?? ""} ${e.reason ?? ""}`.trimEnd();
    const decision = el("td", { "data-testid": "msg-decision" });
    if (e.decision) decision.append(el("span", { class: `decision d-${e.decision}`, text: e.decision }));
    let payload;
    if (e.decision === "replaced" && e.after) {
      payload = el("td", { "data-testid": "msg-payload", class: "replaced" },
        el("div", { "data-testid": "msg-before" }, el("span", { class: "label", text: "before" }), payloadView(e, e.size)),
        el("div", { "data-testid": "msg-after" }, el("span", { class: "label", text: "after" }), payloadView(e.after, e.after.size)));
    } else if (e.type === "text" || e.type === "binary" || e.payload) {
      payload = el("td", { "data-testid": "msg-payload" }, payloadView(e, e.size));
    } else {
      payload = el("td", { "data-testid": "msg-payload" });
    }
    const size = e.decision === "replaced" && e.after ? `${formatSize(e.size)} → ${formatSize(e.after.size)}` : formatSize(e.size);
    tr.append(
      el("td", { class: "mono", title: isoTime(e.time_ms), text: formatTime(e.time_ms) }),
      el("td", { class: "dir", title: dir.words, "data-testid": "msg-dir" }, dir.arrow, from),
      el("td", { "data-testid": "msg-type", text: type }),
      el("td", { class: "num", text: size }),
      el("td", { class: "num", text: e.frames === undefined ? "" : String(e.frames) }),
      el("td", { class: "mono", "data-testid": "msg-mask", text: e.mask || "" }),
      decision,
      el("td", { class: "num", text: formatMicros(e.policy_us) }),
      payload,
    );
    tr.hidden = !entryVisible(e);
    return tr;
  }

  // ---- message filters and pause ----

  const view = { direction: "", types: new Set(["text", "binary", "ping", "pong", "close"]) };

  function entryVisible(e) {
    return (!view.direction || e.direction === view.direction) && view.types.has(e.type);
  }

  function applyMessageFilter() {
    // Row i shows entries[i]: rows are appended in order and trimmed with their entries.
    const rows = $("msg-rows").children;
    for (let i = 0; i < rows.length; i++) {
      const e = detail.entries[i];
      if (e) rows[i].hidden = !entryVisible(e);
    }
  }

  function renderPaused() {
    const b = $("pause");
    b.textContent = detail.paused ? "Resume" : "Pause";
    b.setAttribute("aria-pressed", detail.paused ? "true" : "false");
    const waiting = detail.entries.length - detail.shown;
    $("paused-count").textContent = detail.paused ? `paused · ${waiting} new` : "";
  }

  // ---- actions ----

  function parseHex(text) {
    const clean = text.replace(/^0x/i, "").replace(/[\s:,]/g, "");
    if (!/^([0-9a-fA-F]{2})*$/.test(clean)) {
      throw new Error("binary: give an even number of hex digits, e.g. 00 ff 10");
    }
    const out = new Uint8Array(clean.length / 2);
    for (let i = 0; i < out.length; i++) out[i] = parseInt(clean.substr(i * 2, 2), 16);
    return out;
  }

  async function act(what, fn) {
    try {
      const done = await fn();
      setStatus(done || `${what}: done`, "ok", "action");
    } catch (e) {
      setStatus(`${what} failed: ${e.message}`, "error", "action");
    }
  }

  function onSend(ev) {
    ev.preventDefault();
    const id = detail.id;
    const to = $("send-to").value;
    const kind = $("send-kind").value;
    const text = $("send-body").value;
    act(`Send to ${to}`, async () => {
      let body;
      let type;
      if (kind === "binary") {
        body = parseHex(text);
        type = "application/octet-stream";
      } else {
        body = text;
        type = "text/plain; charset=utf-8";
      }
      await api("POST", `${connPath(id)}/send?${new URLSearchParams({ to })}`, body, type);
      return `Queued a ${kind} message of ${kind === "binary" ? body.length : new TextEncoder().encode(body).length} bytes to the ${to} of ${id}.`;
    });
  }

  function onClose(ev) {
    ev.preventDefault();
    const id = detail.id;
    const code = $("close-code").value.trim();
    const reason = $("close-reason").value;
    act(`Close ${id}`, async () => {
      const r = await api("DELETE", `${connPath(id)}?${new URLSearchParams({ code, reason })}`);
      return `Closing ${id} with ${r?.code ?? code} ${r?.reason ?? reason}.`;
    });
  }

  function onCaptureMode() {
    const id = detail.id;
    const gen = detail.gen;
    const mode = $("capture-mode").value;
    act(`Capture ${mode}`, async () => {
      try {
        const r = await api("POST", `${connPath(id)}/capture?${new URLSearchParams({ mode })}`);
        if (gen === detail.gen) detail.mode = r?.mode || mode;
      } finally {
        if (gen === detail.gen) renderDetailState();
      }
      if (gen === detail.gen && !detail.source && !detail.closed) await loadCapture(gen);
      return `Capture of ${id} is ${mode}.`;
    });
  }

  function onDownload() {
    const id = detail.id;
    act("Download", async () => {
      const cap = await api("GET", `${connPath(id)}/capture`);
      const blob = new Blob([JSON.stringify(cap, null, 2)], { type: "application/json" });
      const url = URL.createObjectURL(blob);
      const a = el("a", { href: url, download: `framegate-conn-${id}.json` });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
      return `Saved framegate-conn-${id}.json (${(cap.entries || []).length} entries).`;
    });
  }

  // ---- wiring ----

  function start() {
    $("conn-filter").addEventListener("input", (e) => {
      list.filter = e.target.value.trim().toLowerCase();
      renderList();
    });
    const pick = (e) => {
      const tr = e.target.closest("tr[data-id]");
      if (tr) select(Number(tr.dataset.id));
    };
    $("conn-rows").addEventListener("click", pick);
    $("conn-rows").addEventListener("mouseenter", () => {
      list.pointerIn = true;
    });
    $("conn-rows").addEventListener("mouseleave", () => {
      list.pointerIn = false;
      renderList();
    });
    $("conn-rows").addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        pick(e);
      }
    });
    $("pause").addEventListener("click", () => {
      detail.paused = !detail.paused;
      if (!detail.paused) flushEntries();
      renderPaused();
    });
    $("dir-filter").addEventListener("change", (e) => {
      view.direction = e.target.value;
      applyMessageFilter();
    });
    $("send-kind").addEventListener("change", (e) => {
      $("send-body").placeholder = e.target.value === "binary" ? "hex, e.g. 00 01 fe ff" : "message";
    });
    for (const box of document.querySelectorAll("[data-testid=type-filter] input")) {
      box.addEventListener("change", () => {
        if (box.checked) view.types.add(box.value);
        else view.types.delete(box.value);
        applyMessageFilter();
      });
    }
    $("send-form").addEventListener("submit", onSend);
    $("close-form").addEventListener("submit", onClose);
    $("capture-mode").addEventListener("change", onCaptureMode);
    $("download").addEventListener("click", onDownload);
    const m = /^#conn=(\d+)$/.exec(location.hash);
    if (m) select(Number(m[1]));
    poll();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
