// The operator console. No framework, no build step, no third-party code: the
// sidecar serves this file as is (sidecar/src/console). Everything the page shows
// comes from the gateway's own APIs through the edge, with the operator's JWT;
// commands are protobuf `control.Command`s signed here with WebCrypto Ed25519 and
// posted to the edge's command path (the sidecar's `command_path`, written into
// the page; /api/control/commands as shipped), where the edge and the sidecar verify them
// like gwctl's. Untrusted strings (ledger rows, errors) only ever reach the page
// as text nodes.

const MODULES = ["arbitrage", "mev"];
const ACTIONS = ["start", "stop", "restart", "throttle", "policy", "kill"];
const LADDER = ["viewer", "operator", "admin"];
const SUBPROTOCOL = "gw.realtime.v1";
const MAX_ROWS = 200;
// Where the edge takes signed commands: the filter's command_path, which the
// sidecar writes into the page.
const COMMAND_PATH =
  document.querySelector('meta[name="gw-command-path"]')?.content || "/api/control/commands";

// ---------------------------------------------------------------- protobuf

function varint(out, n) {
  let v = BigInt(n);
  if (v < 0n) throw new RangeError("varint is unsigned");
  while (v >= 0x80n) {
    out.push(Number(v & 0x7fn) | 0x80);
    v >>= 7n;
  }
  out.push(Number(v));
}

function tag(out, field, wire) { varint(out, (field << 3) | wire); }

function lenField(out, field, bytes) {
  if (bytes.length === 0) return; // proto3: defaults are not written
  tag(out, field, 2);
  varint(out, bytes.length);
  for (const b of bytes) out.push(b);
}

function intField(out, field, n) {
  if (BigInt(n) === 0n) return;
  tag(out, field, 0);
  varint(out, n);
}

const utf8 = (s) => new TextEncoder().encode(s);

/** The deterministic encoding of a `control.Command` (fields by number, args by
 * key, defaults omitted): the same bytes prost and Python's deterministic
 * SerializeToString write. `sig` empty gives the signing payload. */
export function encodeCommand(c) {
  const out = [];
  intField(out, 1, c.ts);
  intField(out, 2, MODULES.indexOf(c.module));
  intField(out, 3, ACTIONS.indexOf(c.action));
  for (const k of Object.keys(c.args || {}).sort()) {
    const entry = [];
    lenField(entry, 1, utf8(k));
    lenField(entry, 2, utf8(String(c.args[k])));
    tag(out, 4, 2);
    varint(out, entry.length);
    for (const b of entry) out.push(b);
  }
  lenField(out, 5, utf8(c.request_id || ""));
  lenField(out, 6, utf8(c.issuer || ""));
  lenField(out, 7, utf8(c.schema_version || ""));
  lenField(out, 8, c.sig || new Uint8Array());
  lenField(out, 9, utf8(c.pubkey_id || ""));
  lenField(out, 10, utf8(c.sig_alg || ""));
  intField(out, 11, c.nonce);
  return new Uint8Array(out);
}

/** Signs `cmd` (without sig fields) with `key` (a WebCrypto Ed25519 private key)
 * under `pubkeyId`; returns the encoded signed command. */
export async function signCommand(cmd, key, pubkeyId) {
  const payload = encodeCommand({ ...cmd, sig: null, pubkey_id: "", sig_alg: "" });
  const sig = new Uint8Array(await crypto.subtle.sign({ name: "Ed25519" }, key, payload));
  return encodeCommand({ ...cmd, sig, pubkey_id: pubkeyId, sig_alg: "ed25519-v1" });
}

// ---------------------------------------------------------------- keys

function hexToBytes(hex) {
  const h = hex.trim().toLowerCase();
  if (!/^([0-9a-f]{2})+$/.test(h)) throw new Error("not hex");
  const out = new Uint8Array(h.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(h.slice(2 * i, 2 * i + 2), 16);
  return out;
}

// PKCS#8 for an Ed25519 seed (RFC 8410): a fixed 16-byte header, then the seed.
const PKCS8_ED25519 = hexToBytes("302e020100300506032b657004220420");

/** Imports an Ed25519 private key from 64 hex characters (a 32-byte seed, as
 * `gwctl` keeps it) or a PKCS#8 PEM, as a non-extractable signing key. */
export async function importSigningKey(text) {
  let der;
  const t = text.trim();
  if (t.startsWith("-----BEGIN PRIVATE KEY-----")) {
    const b64 = t.replace(/-----[A-Z ]+-----/g, "").replace(/\s+/g, "");
    der = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
  } else {
    const seed = hexToBytes(t);
    if (seed.length !== 32) throw new Error("an Ed25519 seed is 32 bytes (64 hex characters)");
    der = new Uint8Array(PKCS8_ED25519.length + 32);
    der.set(PKCS8_ED25519);
    der.set(seed, PKCS8_ED25519.length);
    seed.fill(0);
  }
  const key = await crypto.subtle.importKey("pkcs8", der, { name: "Ed25519" }, false, ["sign"]);
  der.fill(0);
  return key;
}

// ---------------------------------------------------------------- state

const S = {
  token: null,
  claims: null,
  roles: [],
  key: null,
  keyId: "",
  issuer: "",
  modules: {},
  decisions: [],
  sends: [],
  ws: null,
  wsOpened: 0,
  wsRetry: 1000,
  reconnect: null,
  timers: [],
  loggingIn: false,
};

const $ = (id) => document.getElementById(id);

/** Builds an element; children are nodes or strings (always text, never HTML). */
function h(tagName, attrs = {}, ...children) {
  const el = document.createElement(tagName);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const hasRole = (need) => {
  const n = LADDER.indexOf(need);
  return S.roles.some((r) => (n < 0 ? r === need : LADDER.indexOf(r) >= n));
};

function showWho() {
  const c = S.claims || {};
  const exp = c.exp ? `, until ${new Date(c.exp * 1000).toLocaleString()}` : "";
  $("who").textContent = `${c.sub || "?"} (${S.roles.join(", ") || "no roles"}${exp})`;
}

function decodeClaims(token) {
  const parts = token.split(".");
  if (parts.length !== 3) throw new Error("a JWT has three dot-separated parts");
  const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
  const json = new TextDecoder().decode(Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0)));
  return JSON.parse(json);
}

const time = (ms) => new Date(ms).toLocaleTimeString([], { hour12: false });

// ---------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, code, detail) {
    super(`${status} ${code}: ${detail}`);
    this.status = status;
    this.code = code;
    this.detail = detail;
  }
}

async function api(path, opts = {}) {
  const headers = { authorization: `Bearer ${S.token}`, ...(opts.headers || {}) };
  const r = await fetch(path, { ...opts, headers, cache: "no-store" });
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = null; }
  if (!r.ok) {
    throw new ApiError(r.status, body?.error || "http_" + r.status, body?.detail || text.slice(0, 200));
  }
  return body;
}

// ---------------------------------------------------------------- login

function showLogin(message) {
  $("login").hidden = false;
  $("app").hidden = true;
  $("logout").hidden = true;
  $("who").textContent = "";
  $("login-error").textContent = message || "";
}

async function login(token) {
  // One login at a time: a second (the form sent twice, or sent while a saved
  // token is being checked) opened a second stream that nothing could close.
  if (S.loggingIn) return;
  S.loggingIn = true;
  const submit = $("login-form").querySelector("button[type=submit]");
  submit.disabled = true;
  try {
    await loginNow(token);
  } finally {
    S.loggingIn = false;
    submit.disabled = false;
  }
}

async function loginNow(token) {
  let claims;
  try {
    claims = decodeClaims(token);
  } catch (e) {
    showLogin(`not a JWT: ${e.message}`);
    return;
  }
  S.token = token;
  S.claims = claims;
  // Until the stream's hello says which roles the edge found (below).
  const rc = claims.roles;
  S.roles = Array.isArray(rc) ? rc.map(String) : typeof rc === "string" ? rc.split(/[ ,]+/) : [];
  // The edge decides: a cheap viewer route proves the token before the page shows
  // anything. (A 5xx means the ledger cannot answer now; the stream's handshake
  // still checks the token at the edge.)
  let warning = "";
  try {
    await api("/api/ledger/checkpoints");
  } catch (e) {
    if (e.status === 401 || e.status === 403) {
      S.token = null;
      sessionStorage.removeItem("gw.jwt");
      showLogin(`refused by the gateway: ${e.code} — ${e.detail}`);
      return;
    }
    warning = `the ledger cannot answer now (${e.code})`;
  }
  sessionStorage.setItem("gw.jwt", token);
  // Not left in the form, where the next person at this browser would find it.
  $("token").value = "";
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  showWho();
  if (warning) $("chain").textContent = warning;
  renderModules();
  connect();
  refreshAll();
  for (const t of S.timers) clearInterval(t);
  S.timers = [setInterval(refreshAll, 15000)];
}

// Logs out: the token, the imported key, the stream and every table go with
// the page, which is loaded afresh (nothing of the session is left for the next
// person at this browser: the token in the form, a key shown as imported, the
// ledger and sends on screen). `note` is shown on the login form.
function logout(note) {
  sessionStorage.removeItem("gw.jwt");
  if (note) sessionStorage.setItem("gw.note", note);
  S.token = null;
  S.key = null;
  for (const t of S.timers) clearInterval(t);
  S.timers = [];
  clearTimeout(S.reconnect);
  const ws = S.ws;
  S.ws = null;
  if (ws) ws.close(1000, "logout");
  $("token").value = "";
  location.reload();
}

// ---------------------------------------------------------------- live stream

function setLive(on, text) {
  const el = $("live");
  el.className = "pill " + (on ? "on" : "off");
  el.textContent = text;
}

// A stream that stayed up this long reconnects after 1 s when it closes; one that
// closed sooner waits twice as long as the last time (up to 30 s).
const STREAM_STABLE_MS = 10000;

function connect() {
  if (!S.token) return;
  // One stream at a time: one still open is closed, not left to run unseen.
  clearTimeout(S.reconnect);
  if (S.ws) {
    const old = S.ws;
    S.ws = null;
    old.close(1000, "replaced");
  }
  const url = `wss://${location.host}/api/realtime`;
  let ws;
  try {
    ws = new WebSocket(url, [SUBPROTOCOL, `bearer.${S.token}`]);
  } catch (e) {
    setLive(false, `stream: ${e.message}`);
    return;
  }
  S.ws = ws;
  ws.onopen = () => { if (S.ws === ws) { S.wsOpened = Date.now(); setLive(true, "live"); } };
  ws.onmessage = (ev) => {
    if (S.ws !== ws) return;
    let m;
    try { m = JSON.parse(ev.data); } catch { return; }
    onEvent(m);
  };
  ws.onclose = (ev) => {
    if (S.ws !== ws) return;
    S.ws = null;
    const why = ev.code === 4008 ? "too slow, reconnecting" : `closed (${ev.code}${ev.reason ? ": " + ev.reason : ""})`;
    setLive(false, `stream ${why}`);
    // 4001: the gateway ended the stream at the token's expiry (its clock, not
    // this browser's).
    if (ev.code === 4001 || (S.claims?.exp && S.claims.exp * 1000 <= Date.now())) {
      logout("the token has expired: log in again");
      return;
    }
    if (S.token) {
      // The wait doubles (to 30 s) unless the stream stayed up a while: one
      // closed soon after it opened (too slow under a flood, say) is not
      // reopened every second.
      if (S.wsOpened && Date.now() - S.wsOpened >= STREAM_STABLE_MS) S.wsRetry = 1000;
      S.wsOpened = 0;
      S.reconnect = setTimeout(connect, S.wsRetry);
      S.wsRetry = Math.min(S.wsRetry * 2, 30000);
    }
  };
}

// Tables are drawn at most once per frame, however fast events come: a flood
// (edge refusals, sends) costs one redraw per frame, not one per event.
const redraws = new Set();
function redraw(render) {
  if (redraws.size === 0) {
    requestAnimationFrame(() => {
      const due = [...redraws];
      redraws.clear();
      for (const r of due) {
        try { r(); } catch (e) { console.error(e); }
      }
    });
  }
  redraws.add(render);
}

function onEvent(m) {
  if (m.type === "hello") {
    $("node").textContent = `node ${m.node_id}`;
    // The roles the edge found in the token (its `roles_claim`, which may not
    // be `roles`): what the gateway decides by, so what the page offers.
    if (Array.isArray(m.roles)) {
      const roles = m.roles.map(String);
      if (roles.join(",") !== S.roles.join(",")) {
        S.roles = roles;
        showWho();
        renderModules();
        refreshAll();
      }
    }
    if (m.modules) {
      S.modules = m.modules;
      renderModules();
    }
    return;
  }
  streamLine(m);
  if (m.type === "decision") {
    if (!L.keeps(m)) return;
    if (L.paged()) {
      L.newer++;
    } else {
      S.decisions.unshift(m);
      S.decisions.length = Math.min(S.decisions.length, L.size);
    }
    redraw(renderDecisions);
  } else if (m.type === "module") {
    S.modules[m.module] = m.state;
    redraw(renderModules);
  } else if (m.type === "send") {
    S.sends.unshift(m);
    S.sends.length = Math.min(S.sends.length, MAX_ROWS);
    redraw(renderSends);
  }
}

function streamLine(m) {
  let text;
  if (m.type === "decision") {
    text = `${time(m.ts_ms)} decision ${m.stage} ${m.decision}${m.code ? " " + m.code : ""} ` +
      `${m.module}:${m.action} by ${m.requester || "?"} request ${m.request_id || "-"}`;
  } else if (m.type === "module") {
    text = `${time(Date.now())} module ${m.module} → ${m.state.state} throttle ${m.state.throttle_pct}%`;
  } else if (m.type === "send") {
    text = `${time(m.ts_us / 1000)} send ${m.signature.slice(0, 12)}… ${m.outcome} via ${m.route || "-"}` +
      `${m.hedged ? " (hedged)" : ""} ${m.latency_us} µs`;
  } else {
    return;
  }
  const list = $("stream");
  list.prepend(h("li", { class: "t-" + m.type }, text));
  while (list.childElementCount > MAX_ROWS) list.lastElementChild.remove();
}

// ---------------------------------------------------------------- modules

function renderModules() {
  const box = $("modules");
  box.replaceChildren();
  const canCommand = hasRole("admin");
  const ready = canCommand && S.key !== null;
  for (const name of MODULES) {
    const st = S.modules[name];
    const card = h("article", { class: "module", "aria-label": `module ${name}`, "data-module": name });
    card.append(h("h3", {}, name, st ? h("span", { class: "state-" + st.state }, st.state) : h("span", { class: "muted" }, "unknown")));
    if (st) {
      card.append(h("dl", { class: "kv" },
        h("dt", {}, "throttle"), h("dd", { "data-field": "throttle_pct" }, `${st.throttle_pct}%`),
        h("dt", {}, "ev_min"), h("dd", {}, st.ev_min ?? "—"),
        h("dt", {}, "tip ladder"), h("dd", {}, (st.tip_ladder || []).join(", ") || "—"),
        h("dt", {}, "applied"), h("dd", {}, st.applied),
        h("dt", {}, "restarts"), h("dd", {}, st.restarts),
        h("dt", {}, "last request"), h("dd", {}, st.last_request_id || "—")));
    }
    if (canCommand) {
      const btn = (action, label, cls) => h("button", {
        type: "button", class: cls, disabled: !ready,
        onclick: () => action === "kill" ? confirmKill(name) : command(name, action, {}),
      }, label);
      card.append(h("div", { class: "row" }, btn("start", "Start"), btn("stop", "Stop"),
        btn("restart", "Restart"), btn("kill", "Kill", "danger")));
      const pct = h("input", { type: "number", min: 0, max: 100, step: 1, value: st ? st.throttle_pct : 100,
        id: `throttle-${name}`, disabled: !ready });
      card.append(h("form", {
        class: "row", novalidate: true,
        onsubmit: (e) => { e.preventDefault(); command(name, "throttle", { throttle_pct: pct.value.trim() }); },
      }, h("label", { for: `throttle-${name}` }, "throttle %"), pct,
        h("button", { type: "submit", disabled: !ready }, "Throttle")));
      const ev = h("input", { id: `ev-${name}`, value: st?.ev_min ?? "", size: 6, disabled: !ready, spellcheck: "false" });
      const ladder = h("input", { id: `ladder-${name}`, value: (st?.tip_ladder || []).join(","), size: 12, disabled: !ready, spellcheck: "false" });
      card.append(h("form", {
        class: "row", novalidate: true,
        onsubmit: (e) => {
          e.preventDefault();
          const args = {};
          if (ev.value.trim()) args.ev_min = ev.value.trim();
          if (ladder.value.trim()) args.tip_ladder = ladder.value.trim();
          command(name, "policy", args);
        },
      }, h("label", { for: `ev-${name}` }, "ev_min"), ev, h("label", { for: `ladder-${name}` }, "tip ladder"), ladder,
        h("button", { type: "submit", disabled: !ready }, "Set policy")));
    }
    box.append(card);
  }
  if (!canCommand) {
    box.append(h("p", { class: "muted small" }, "Commands need role admin; this token has " + (S.roles.join(", ") || "none") + "."));
  }
}

function confirmKill(module) {
  const res = $("result");
  res.className = "result bad";
  res.replaceChildren(`Kill ${module}? It sends nothing until started again. `,
    h("button", { type: "button", class: "danger", onclick: () => command(module, "kill", {}) }, `Kill ${module}`),
    " ",
    h("button", { type: "button", onclick: () => { res.replaceChildren(); } }, "Cancel"));
  res.querySelector("button").focus();
}

let lastNonce = 0n;

function nextNonce() {
  // Unix nanoseconds as gwctl does, strictly increasing in this tab; the clock has
  // millisecond resolution here, so the sub-millisecond digits are random (two
  // tabs signing for one issuer in the same millisecond must not collide).
  const sub = crypto.getRandomValues(new Uint32Array(1))[0] % 1000000;
  const now = BigInt(Date.now()) * 1000000n + BigInt(sub);
  lastNonce = now > lastNonce ? now : lastNonce + 1n;
  return lastNonce;
}

async function command(module, action, args) {
  const res = $("result");
  res.className = "result";
  if (!S.key) {
    res.textContent = "import a command key first";
    return;
  }
  const cmd = {
    ts: Math.floor(Date.now() / 1000),
    module, action, args,
    request_id: crypto.randomUUID(),
    issuer: S.issuer,
    schema_version: "ctrl-v1",
    nonce: nextNonce(),
  };
  res.textContent = `sending ${module}:${action} (request ${cmd.request_id})…`;
  try {
    const body = await signCommand(cmd, S.key, S.keyId);
    const answer = await api(COMMAND_PATH, {
      method: "POST", headers: { "content-type": "application/x-protobuf" }, body,
    });
    res.className = "result ok";
    res.textContent = `${module}:${action} ${answer.applied ? "applied" : "accepted"} — request ${cmd.request_id}` +
      (answer.ledger ? ` (ledger ${answer.ledger.chain_id}#${answer.ledger.applied_seq || answer.ledger.accepted_seq})` : "");
  } catch (e) {
    res.className = "result bad";
    res.replaceChildren(h("span", { "data-code": e.code || "error" }, `refused: ${e.code || "error"}`),
      ` — ${e.detail || e.message} (request ${cmd.request_id})`);
  }
}

async function onKey(e) {
  e.preventDefault();
  const secret = $("key-secret");
  try {
    S.key = await importSigningKey(secret.value);
    S.keyId = $("key-id").value.trim();
    S.issuer = $("key-issuer").value.trim();
    $("key-status").textContent = `Key ${S.keyId} imported (issuer ${S.issuer}); it cannot be read back from this page.`;
    $("key-forget").hidden = false;
  } catch (err) {
    S.key = null;
    $("key-status").textContent = `Key not imported: ${err.message || err.name}`;
  }
  secret.value = "";
  renderModules();
}

// ---------------------------------------------------------------- ledger

// The decisions shown: the newest, live (the stream's join them), until the
// operator pages to older ones; only a stage and a decision when chosen, asked of
// the server (a flood of refusals cannot push the applied commands out of a page).
// A page starts below the last decision of the one before (`before`, the cursor
// the ledger API takes), so decisions arriving meanwhile do not shift it.
const L = {
  stage: "",
  decision: "",
  size: MAX_ROWS,
  // The cursor each page after the newest starts below; empty: live.
  pages: [],
  rows: [],
  // Decisions the stream brought since the pages were left (not shown).
  newer: 0,
  // The last page asked for came back short: nothing older in the last 24 h.
  end: false,
  // Counts the operator's moves (a page, the newest, a filter): an answer asked
  // for before the last move is dropped.
  gen: 0,
  // Why the last page could not be read (shown until one is).
  error: "",
  reset() {
    this.pages = [];
    this.rows = [];
    this.newer = 0;
    this.end = false;
    this.error = "";
    this.gen++;
  },
  paged() { return this.pages.length > 0; },
  keeps(d) {
    return (!this.stage || d.stage === this.stage) && (!this.decision || d.decision === this.decision);
  },
  query(before) {
    const q = new URLSearchParams({ limit: String(this.size) });
    if (this.stage) q.set("stage", this.stage);
    if (this.decision) q.set("decision", this.decision);
    if (before) q.set("before", before);
    return `/api/ledger/history?${q}`;
  },
};

const cursorOf = (d) => `${d.ts_ms}.${d.seq}.${d.chain_id}`;

async function showPage(pages) {
  const before = pages[pages.length - 1];
  const gen = ++L.gen;
  try {
    const rows = await api(L.query(before));
    if (gen !== L.gen || !S.token) return;
    L.error = "";
    if (before && rows.length === 0) {
      L.end = true;
    } else {
      // The cursor the page starts below, for whoever reads the table.
      $("decisions").dataset.before = before || "";
      L.pages = pages;
      L.rows = rows;
      L.end = rows.length < L.size;
    }
  } catch (e) {
    if (gen !== L.gen) return;
    L.error = `ledger: ${e.code || "error"} — ${e.detail || e.message}`;
  }
  renderDecisions();
}

// Whether decision `a` sorts before `b` in the ledger's order (its key: time,
// chain, seq; the server's `before` compares the same).
const keyBefore = (a, b) => a.ts_ms !== b.ts_ms ? a.ts_ms < b.ts_ms
  : a.chain_id !== b.chain_id ? a.chain_id < b.chain_id : a.seq < b.seq;

function olderPage() {
  const shown = L.paged() ? L.rows : S.decisions;
  if (shown.length === 0) return;
  // The oldest shown by key, not the last drawn: the live table is in the order
  // rows arrived, which is not always the key's.
  const last = shown.reduce((m, d) => (keyBefore(d, m) ? d : m));
  if (!L.paged()) L.newer = 0;
  showPage([...L.pages, cursorOf(last)]);
}

function newerPage() {
  if (L.pages.length <= 1) newestPage();
  else showPage(L.pages.slice(0, -1));
}

function newestPage() {
  L.reset();
  loadHistory();
}

function onLedgerFilter() {
  L.stage = $("ledger-stage").value;
  L.decision = $("ledger-decision").value;
  L.size = Number($("ledger-size").value) || MAX_ROWS;
  S.decisions = [];
  $("ledger-page").textContent = "loading…";
  $("decisions").tBodies[0].replaceChildren();
  newestPage();
}

function renderDecisions() {
  const rows = L.paged() ? L.rows : S.decisions;
  const first = rows[0];
  const last = rows[rows.length - 1];
  const span = first ? `${time(first.ts_ms)} back to ${time(last.ts_ms)}` : "none";
  $("ledger-page").textContent = L.error ? L.error : L.paged()
    ? `older decisions, page ${L.pages.length + 1}: ${rows.length}, ${span}` +
      (L.newer ? ` — ${L.newer} newer since` : "") +
      (L.end ? " — no older decisions in the last 24 h" : "")
    : `newest ${rows.length}, live: ${span}` + (L.end ? " — nothing older in the last 24 h" : "");
  $("ledger-older").disabled = rows.length === 0 || L.end;
  $("ledger-newer").disabled = !L.paged();
  $("ledger-newest").disabled = !L.paged();
  const tbody = $("decisions").tBodies[0];
  tbody.replaceChildren(...rows.map((d) => h("tr", { "data-key": `${d.chain_id}#${d.seq}` },
    h("td", {}, time(d.ts_ms)),
    h("td", {}, d.stage),
    h("td", {}, d.decision),
    h("td", { class: d.code ? "code" : "" }, d.code || ""),
    h("td", {}, d.module || d.action ? `${d.module}:${d.action}` : ""),
    h("td", {}, d.requester || ""),
    h("td", { class: "link" }, d.request_id
      ? h("button", { type: "button", onclick: () => showRequest(d.request_id), title: "this request's whole history" },
        d.request_id.length > 14 ? d.request_id.slice(0, 13) + "…" : d.request_id)
      : ""))));
}

// Ledger rows reach ClickHouse a moment after they are durable (the sidecar ships
// them in batches, at most every ledger_ship_every_ms): a request looked up right
// after it was decided is asked for again until its agent's row is there.
const HISTORY_TRIES = 12;
const HISTORY_RETRY_MS = 250;

async function showRequest(id) {
  $("request-id").value = id;
  const box = $("request-history");
  box.replaceChildren(h("p", { class: "muted" }, `loading ${id}…`));
  for (let attempt = 1; ; attempt++) {
    let rows;
    try {
      rows = await api(`/api/ledger/request/${encodeURIComponent(id)}`);
    } catch (e) {
      box.replaceChildren(h("p", { class: "error" }, `${e.code || "error"}: ${e.detail || e.message}`));
      return;
    }
    if ($("request-id").value !== id) return; // another lookup started meanwhile
    box.replaceChildren(h("h3", {}, `Request ${id}`), rows.length === 0
      ? h("p", { class: "muted" }, "no decisions recorded (yet)")
      : h("ol", {}, rows.map((r) => h("li", {},
        `${time(r.ts_ms)} ${r.chain_id}#${r.seq} ${r.stage} ${r.decision}${r.code ? " " + r.code : ""} ` +
        `${r.module}:${r.action} by ${r.requester || "?"} (${r.requester_roles || "-"}) via ${r.route || "-"}`))));
    if (rows.some((r) => r.stage === "agent") || attempt >= HISTORY_TRIES) return;
    await new Promise((ok) => setTimeout(ok, HISTORY_RETRY_MS));
  }
}

async function verifyChain() {
  const el = $("chain");
  el.textContent = "verifying…";
  try {
    const v = await api("/api/ledger/verify");
    const chains = v.chains.map((c) =>
      `chain ${c.chain_id}: ${c.ok ? "verified" : "BROKEN"} (${c.rows} rows` +
      `${c.checkpoint === undefined ? "" : `, held to its signed checkpoint of ${c.checkpoint} rows`}` +
      `${c.anchored || !v.checkpoints ? "" : c.this_node ? ", this node's chain, no signed checkpoint of it yet" :
        ", no checkpoint of this node vouches for it"})` +
      `${c.broken ? " — " + c.broken : ""}`);
    if (v.more_chains_broken) chains.push(`${v.more_chains_broken} more BROKEN chains not listed`);
    if (v.more_chains_ok) chains.push(`${v.more_chains_ok} more chains verified, not listed`);
    if (!v.checkpoints) {
      chains.push("this node signs no checkpoints (no ledger key): its rows are held to their own hashes only");
    } else if (v.unanchored) {
      chains.push(`${v.unanchored} chain(s) held to their own hashes only: another node's, or written whole ` +
        "by anyone who can INSERT — gwctl ledger verify --checkpoint with every node's file tells them apart");
    }
    if (v.not_utf8) {
      chains.push(`BROKEN: ${v.not_utf8.rows} rows under ${v.not_utf8.chains} chain ids that are not UTF-8 ` +
        "(no gateway writes one), not walked");
    }
    if (v.error) chains.push(`NOT VERIFIED — ${v.error}`);
    el.textContent = chains.length === 0 ? "no chain stored yet" : chains.join("; ");
    el.className = v.ok ? "" : "error";
  } catch (e) {
    el.textContent = `chain: ${e.code || "error"} — ${e.detail || e.message}`;
    el.className = "error";
  }
  loadCheckpoints();
}

async function loadCheckpoints() {
  try {
    const cps = await api("/api/ledger/checkpoints");
    $("checkpoint").textContent = cps.length === 0 ? "no signed checkpoint yet" : cps.map((c) =>
      `latest checkpoint ${c.chain_id}: ${c.size} rows at ${new Date(c.ts_ms).toLocaleString()}, head ${c.head.slice(0, 16)}…` +
      (c.signed_here ? " (signed by this node)" : " (not verified here)")).join("; ");
  } catch (e) {
    $("checkpoint").textContent = `checkpoints: ${e.code || "error"}`;
  }
}

async function loadHistory() {
  // Older pages stay as they are until the operator leaves them.
  if (L.paged()) return;
  const gen = L.gen;
  try {
    const asked = L.query();
    const rows = await api(asked);
    // The operator moved (a page, the filters) while this was asked: a later call
    // answers for where they are.
    if (gen !== L.gen || asked !== L.query() || L.paged() || !S.token) return;
    L.error = "";
    // Keep what the stream brought that ClickHouse does not hold yet.
    const seen = new Set(rows.map((r) => `${r.chain_id}#${r.seq}`));
    const newer = S.decisions.filter((d) => !seen.has(`${d.chain_id}#${d.seq}`) && d.ts_ms >= (rows[0]?.ts_ms || 0));
    S.decisions = newer.concat(rows).slice(0, L.size);
    L.end = rows.length < L.size;
    renderDecisions();
  } catch (e) {
    if (gen !== L.gen) return;
    L.error = `ledger: ${e.code || "error"} — ${e.detail || e.message}`;
    renderDecisions();
  }
}

// ---------------------------------------------------------------- charts (SVG)

const SVG = "http://www.w3.org/2000/svg";

function svg(tagName, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tagName);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

/** A chart's legend: [[name, colour], …]. */
function legendOf(legend) {
  return h("div", { class: "legend" }, legend.map(([name, color]) => {
    const sw = h("i");
    sw.style.background = color;
    return h("span", {}, sw, name);
  }));
}

/** Stacked bars: `groups` = [{label, parts: [{value, color, name}]}]. */
function barChart(groups, { width = 420, height = 150, legend = [] } = {}) {
  const box = document.createElement("div");
  if (groups.length === 0) {
    box.append(h("p", { class: "muted small" }, "nothing in this window"));
    return box;
  }
  const max = Math.max(1, ...groups.map((g) => g.parts.reduce((a, p) => a + p.value, 0)));
  const pad = 22;
  const bw = (width - pad) / groups.length;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height + 16}`, role: "img",
    "aria-label": groups.map((g) => `${g.label}: ${g.parts.map((p) => `${p.name} ${p.value}`).join(", ")}`).join("; ") });
  chart.append(svg("text", { x: 0, y: 10 }, max));
  groups.forEach((g, i) => {
    let y = height;
    for (const p of g.parts) {
      if (p.value <= 0) continue;
      const bh = (p.value / max) * (height - 14);
      y -= bh;
      chart.append(svg("rect", { x: pad + i * bw + 1, y, width: Math.max(1, bw - 2), height: bh, fill: p.color },
        svg("title", {}, `${g.label} ${p.name}: ${p.value}`)));
    }
    if (groups.length <= 16 || i % Math.ceil(groups.length / 8) === 0) {
      chart.append(svg("text", { x: pad + i * bw, y: height + 12 }, g.label));
    }
  });
  box.append(chart);
  if (legend.length) box.append(legendOf(legend));
  return box;
}

/** Horizontal stacked bars, one row per group (long labels such as codes). */
function hbarChart(groups, { width = 420, legend = [], max: most = 12 } = {}) {
  const box = document.createElement("div");
  if (groups.length === 0) {
    box.append(h("p", { class: "muted small" }, "nothing in this window"));
    return box;
  }
  const shown = groups.slice(0, most);
  const total = (g) => g.parts.reduce((a, p) => a + p.value, 0);
  const max = Math.max(1, ...shown.map(total));
  const row = 16, labelW = 150, height = shown.length * row;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": shown.map((g) => `${g.label}: ${total(g)}`).join("; ") });
  shown.forEach((g, i) => {
    const y = i * row;
    chart.append(svg("text", { x: 0, y: y + 11 }, g.label));
    let x = labelW;
    for (const p of g.parts) {
      if (p.value <= 0) continue;
      const w = (p.value / max) * (width - labelW - 40);
      chart.append(svg("rect", { x, y: y + 2, width: Math.max(1, w), height: row - 4, fill: p.color },
        svg("title", {}, `${g.label} ${p.name}: ${p.value}`)));
      x += w;
    }
    chart.append(svg("text", { x: x + 4, y: y + 11 }, total(g)));
  });
  box.append(chart);
  if (groups.length > most) box.append(h("p", { class: "muted small" }, `and ${groups.length - most} more codes`));
  if (legend.length) box.append(legendOf(legend));
  return box;
}

const COLORS = { tpu: "#58a6ff", relay: "#bc8cff", failed: "#f85149", edge: "#d29922", sidecar: "#f85149", agent: "#3fb950" };

async function loadSends() {
  if (hasRole("operator")) {
    try {
      const s = await api("/api/sender");
      $("sender").textContent = `preferred route ${s.routes.preferred}; landed ${s.sends.landed}, failed ${s.sends.failed}, ` +
        `hedged ${s.sends.hedged}; TPU ${s.routes.tpu.enabled ? "on" : "off"}, relay ${s.routes.relay.enabled ? "on" : "off"}`;
    } catch (e) {
      $("sender").textContent = `sender: ${e.code || "error"} — ${e.detail || e.message}`;
    }
  } else {
    $("sender").textContent = "sender status needs role operator";
  }
  try {
    const st = await api("/api/ledger/sends");
    const minutes = [...new Set(st.per_minute.map((r) => r.minute))].sort((a, b) => a - b);
    const share = minutes.map((m) => {
      const rows = st.per_minute.filter((r) => r.minute === m);
      const landed = (route) => rows.filter((r) => r.route === route && r.outcome === "landed").reduce((a, r) => a + r.count, 0);
      const failed = rows.filter((r) => r.outcome !== "landed").reduce((a, r) => a + r.count, 0);
      return { label: time(m * 1000).slice(0, 5), parts: [
        { name: "tpu", value: landed("tpu"), color: COLORS.tpu },
        { name: "relay", value: landed("relay"), color: COLORS.relay },
        { name: "failed", value: failed, color: COLORS.failed }] };
    });
    $("share-chart").replaceChildren(barChart(share, { legend: [["TPU", COLORS.tpu], ["relay", COLORS.relay], ["failed", COLORS.failed]] }));
    const buckets = [...new Set(st.latency.map((r) => r.le_us))].sort((a, b) => a - b);
    const lat = buckets.map((le) => ({ label: le >= 1000 ? `${le / 1000 | 0}ms` : `${le}`, parts: ["tpu", "relay"].map((route) => ({
      name: route, color: COLORS[route],
      value: st.latency.filter((r) => r.le_us === le && r.route === route).reduce((a, r) => a + r.count, 0) })) }));
    $("latency-chart").replaceChildren(barChart(lat, { legend: [["TPU", COLORS.tpu], ["relay", COLORS.relay]] }));
  } catch (e) {
    $("share-chart").replaceChildren(h("p", { class: "error" }, `${e.code || "error"}: ${e.detail || e.message}`));
  }
}

function renderSends() {
  $("sends").tBodies[0].replaceChildren(...S.sends.map((s) => h("tr", {},
    h("td", {}, time(s.ts_us / 1000)),
    h("td", { title: s.signature }, s.signature.slice(0, 16) + "…"),
    h("td", {}, s.route || "—"),
    h("td", {}, s.hedged ? "yes" : "no"),
    h("td", { class: s.outcome === "landed" ? "" : "code" }, s.outcome),
    h("td", {}, `${s.latency_us} µs`))));
}

async function loadModels() {
  const box = $("models");
  if (!hasRole("operator")) {
    box.replaceChildren(h("p", { class: "muted" }, "models need role operator"));
    return;
  }
  try {
    const view = await api("/api/models");
    box.replaceChildren(...Object.entries(view).map(([module, slot]) => h("div", { class: "module" },
      h("h3", {}, module),
      slot.serving
        ? h("dl", { class: "kv" },
          h("dt", {}, "serving"), h("dd", {}, `${slot.serving.name} ${slot.serving.version}`),
          h("dt", {}, "trainer"), h("dd", {}, `${slot.serving.trainer} (ABI v${slot.serving.abi}, ${slot.serving.leaf_type})`),
          h("dt", {}, "shape"), h("dd", {}, `${slot.serving.n_features} features → ${slot.serving.n_outputs} outputs`),
          h("dt", {}, "verified"), h("dd", {}, slot.serving.golden ? "golden vectors matched" : "no golden vectors"))
        : h("p", { class: "muted" }, "no model serving"),
      h("p", { class: "small" }, `loads ${slot.loads}, rejected ${slot.rejected}`,
        slot.refused ? h("span", { class: "error" }, ` — last refused: ${slot.refused[0]} (${slot.refused[1]})`) : ""),
      slot.history.length
        ? h("ol", { class: "small" }, slot.history.slice(-8).reverse().map((ev) =>
          h("li", {}, `${time(ev.at_ms)} ${ev.outcome} ${ev.path.split("/").pop()}${ev.detail ? " — " + ev.detail : ""}`)))
        : "")));
  } catch (e) {
    box.replaceChildren(h("p", { class: "error" }, `${e.code || "error"}: ${e.detail || e.message}`));
  }
}

async function loadRefusals() {
  try {
    const r = await api("/api/ledger/refusals");
    const codes = [...new Set(r.by_code.map((c) => c.code))];
    const groups = codes.map((code) => ({ label: code, parts: ["edge", "sidecar", "agent"].map((stage) => ({
      name: stage, color: COLORS[stage],
      value: r.by_code.filter((c) => c.code === code && c.stage === stage).reduce((a, c) => a + c.count, 0) })) }));
    groups.sort((a, b) => b.parts.reduce((x, p) => x + p.value, 0) - a.parts.reduce((x, p) => x + p.value, 0));
    $("codes-chart").replaceChildren(hbarChart(groups, { legend: [["edge", COLORS.edge], ["sidecar", COLORS.sidecar], ["agent", COLORS.agent]] }));
    const minutes = [...new Set(r.per_minute.map((m) => m.minute))].sort((a, b) => a - b);
    $("rate-chart").replaceChildren(barChart(minutes.map((m) => ({ label: time(m * 1000).slice(0, 5),
      parts: ["edge", "sidecar", "agent"].map((stage) => ({ name: stage, color: COLORS[stage],
        value: r.per_minute.filter((x) => x.minute === m && x.stage === stage).reduce((a, x) => a + x.count, 0) })) })),
    { legend: [["edge", COLORS.edge], ["sidecar", COLORS.sidecar], ["agent", COLORS.agent]] }));
  } catch (e) {
    $("codes-chart").replaceChildren(h("p", { class: "error" }, `${e.code || "error"}: ${e.detail || e.message}`));
  }
}

async function loadModules() {
  if (!hasRole("operator")) return; // viewers get the states from the stream
  try {
    S.modules = await api("/api/modules");
    renderModules();
  } catch { /* the stream keeps them current */ }
}

function refreshAll() {
  if (!S.token) return;
  loadModules();
  loadHistory();
  loadCheckpoints();
  loadSends();
  loadModels();
  loadRefusals();
}

// ---------------------------------------------------------------- start

function start() {
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    login($("token").value.trim());
  });
  $("logout").addEventListener("click", () => logout(""));
  $("key-form").addEventListener("submit", onKey);
  $("key-forget").addEventListener("click", () => {
    S.key = null;
    $("key-forget").hidden = true;
    $("key-status").textContent = "No key imported: controls are disabled.";
    renderModules();
  });
  $("verify").addEventListener("click", verifyChain);
  for (const id of ["ledger-stage", "ledger-decision", "ledger-size"]) $(id).addEventListener("change", onLedgerFilter);
  $("ledger-older").addEventListener("click", olderPage);
  $("ledger-newer").addEventListener("click", newerPage);
  $("ledger-newest").addEventListener("click", newestPage);
  $("request-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const id = $("request-id").value.trim();
    if (id) showRequest(id);
  });
  const note = sessionStorage.getItem("gw.note") || "";
  sessionStorage.removeItem("gw.note");
  const saved = sessionStorage.getItem("gw.jwt");
  if (saved) login(saved);
  else showLogin(note);
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
else start();
