// The operator console in a real browser: Debian's Chromium, driven by
// playwright-core, against the local gateway (scripts/run-gateway.sh) through
// Envoy. Logs in with a pasted JWT, sees both modules live, proves that the page's
// signed command is byte-for-byte gwctl's, imports the command key, throttles a
// module from the keyboard, sees the command on the live stream, in the module
// card and in the ledger view (with its whole history), sees a refused command's
// code, pages through the ledger and filters it (checked against the API), checks
// what a viewer is offered, and looks at laptop and phone widths.
// No browser console errors are allowed. Screenshots go to --out.
//
//   node tests/console/browser.mjs --run .run --gwctl PATH --out DIR
import { execFileSync } from "node:child_process";
import { mkdirSync, readFileSync } from "node:fs";
import { chromium } from "playwright-core";

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) =>
  (a.startsWith("--") ? [...acc, [a.slice(2), all[i + 1]]] : acc), []));
const run = args.run || ".run";
const gwctl = args.gwctl;
const out = args.out || `${run}/screenshots`;
const base = args.url || "https://localhost:8443";
const chromiumPath = process.env.GW_CHROMIUM || "/usr/bin/chromium";
mkdirSync(out, { recursive: true });

const T0 = Date.now();
const log = (m) => console.log(`browser.mjs [${((Date.now() - T0) / 1000).toFixed(1)}s] ${m}`);
function check(ok, what) {
  if (!ok) throw new Error(`FAIL: ${what}`);
}

const adminJwt = readFileSync(`${run}/admin.jwt`, "utf8").trim();
const seedHex = readFileSync(`${run}/keys/op-admin-1.sk.hex`, "utf8").trim();
const jwt = (role, sub) => execFileSync(gwctl, ["jwt", "--secret-file", `${run}/keys/jwt.secret.hex`,
  "--sub", sub, "--role", role, "--ttl", "10m", "--kid", "dev"], { encoding: "utf8" }).trim();
const viewerJwt = jwt("viewer", "console-viewer");

const browser = await chromium.launch({
  executablePath: chromiumPath,
  headless: true,
  timeout: 60000,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const errors = [];
const allowed400 = { used: false };
async function newPage(viewport) {
  // The dev CA is not in Chromium's store: its certificate errors are ignored for
  // this context only (the page itself talks to nothing else: its CSP says 'self').
  const ctx = await browser.newContext({ viewport, ignoreHTTPSErrors: true });
  const page = await ctx.newPage();
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    // Chromium logs every 4xx answer to fetch() as an error; the one refusal this
    // test provokes on purpose (throttle 150 %) is that, and nothing else may be.
    const expected = m.text().includes("status of 400") && m.location().url.endsWith("/api/control/commands");
    if (expected && !allowed400.used) allowed400.used = true;
    else errors.push(`console: ${m.text()} (${m.location().url})`);
  });
  page.on("pageerror", (e) => errors.push(`pageerror: ${e.message}`));
  page.setDefaultTimeout(20000);
  return page;
}

try {
  // ------------------------------------------------------------ admin, laptop
  const page = await newPage({ width: 1366, height: 900 });
  await page.goto(`${base}/`);
  await page.locator("#login").waitFor();
  // Keyboard: the skip link first, then the token field.
  await page.keyboard.press("Tab");
  check(await page.evaluate(() => document.activeElement?.className === "skip"), "Tab reaches the skip link first");
  await page.screenshot({ path: `${out}/login.png` });
  await page.fill("#token", "not-a-jwt");
  await page.press("#token", "Tab");
  await page.keyboard.press("Enter");
  await page.locator("#login-error", { hasText: "not a JWT" }).waitFor();
  await page.fill("#token", adminJwt);
  await page.click("#login-form button[type=submit]");
  await page.locator("#live", { hasText: "live" }).waitFor();
  for (const m of ["arbitrage", "mev"]) await page.locator(`.module[data-module=${m}]`).waitFor();
  log("logged in as admin; stream live; both modules shown");

  // The page's signed bytes are gwctl's (Ed25519 is deterministic).
  const fixed = { ts: 1767225600, nonce: "1767225600000000123", request_id: "parity-1" };
  const gw = execFileSync(gwctl, ["sign", "--key", `${run}/keys/op-admin-1.sk.hex`, "--key-id", "op-admin-1",
    "--module", "mev", "--action", "policy", "--arg", "ev_min=0.25", "--arg", "tip_ladder=0.1,0.2",
    "--issuer", "dashboard", "--ts", String(fixed.ts), "--nonce", fixed.nonce, "--request-id", fixed.request_id,
    "--out", "-"], { stdio: ["ignore", "pipe", "ignore"] }).toString("hex");
  const mine = await page.evaluate(async ({ fixed, seedHex }) => {
    const m = await import("/console.js");
    const key = await m.importSigningKey(seedHex);
    const body = await m.signCommand({ ts: fixed.ts, module: "mev", action: "policy",
      args: { tip_ladder: "0.1,0.2", ev_min: "0.25" }, request_id: fixed.request_id, issuer: "dashboard",
      schema_version: "ctrl-v1", nonce: BigInt(fixed.nonce) }, key, "op-admin-1");
    return Array.from(body, (b) => b.toString(16).padStart(2, "0")).join("");
  }, { fixed, seedHex });
  check(mine === gw, `the page's signed command equals gwctl's\n page ${mine}\n gwctl ${gw}`);
  log(`signed in the page = gwctl sign, byte for byte (${gw.length / 2} bytes)`);

  // Controls wait for a key; import it through the form.
  check(await page.locator("#throttle-mev").isDisabled(), "controls are disabled before a key is imported");
  await page.fill("#key-secret", seedHex);
  await page.click("#key-form button[type=submit]");
  await page.locator("#key-status", { hasText: "imported" }).waitFor();
  check((await page.inputValue("#key-secret")) === "", "the key field is cleared after import");

  // Throttle mev from the keyboard.
  const pct = String(11 + (Date.now() % 80));
  await page.focus("#throttle-mev");
  await page.fill("#throttle-mev", pct);
  await page.keyboard.press("Enter");
  const result = page.locator("#result.ok");
  await result.waitFor();
  const text = await result.innerText();
  check(text.includes("mev:throttle applied"), `throttle applied: ${text}`);
  const rid = text.match(/request ([0-9a-f-]{36})/)[1];
  await page.locator("#stream li.t-module", { hasText: `module mev → ` }).filter({ hasText: `throttle ${pct}%` }).first().waitFor();
  await page.locator("#stream li.t-decision", { hasText: rid }).first().waitFor();
  await page.locator(`.module[data-module=mev] [data-field=throttle_pct]`, { hasText: `${pct}%` }).waitFor();
  log(`throttle mev ${pct}% signed in the browser, applied (request ${rid}); seen on the live stream`);

  // In the ledger view, and its whole history.
  const row = page.locator("#decisions tbody tr", { hasText: "applied" }).filter({ has: page.locator(`button[title]`) });
  await row.first().waitFor();
  await page.fill("#request-id", rid);
  await page.press("#request-id", "Enter");
  const hist = page.locator("#request-history li");
  await hist.filter({ hasText: "applied" }).first().waitFor();
  const histText = await page.locator("#request-history").innerText();
  check(/sidecar accepted/.test(histText) && /agent applied/.test(histText) && histText.includes("console") === false,
    `request history: ${histText}`);
  log("the ledger view shows the request's history (edge → sidecar → agent)");

  // A refused command: its code, on the page and on the stream.
  await page.fill("#throttle-mev", "150");
  await page.click(`.module[data-module=mev] form button[type=submit]`);
  await page.locator("#result.bad [data-code=bad_args]").waitFor();
  await page.locator("#stream li.t-decision", { hasText: "bad_args" }).first().waitFor();
  log("a throttle of 150 % is refused: bad_args on the page and on the stream");

  // The kill control asks first, and keeps focus on the question.
  await page.click(`.module[data-module=arbitrage] button.danger`);
  check(await page.evaluate(() => document.activeElement?.textContent === "Kill arbitrage"), "kill asks for confirmation, focused");
  await page.click("#result button:not(.danger)");

  // The ledger pages. More decisions than two pages of 20 first: the same
  // throttle again over the JSON route (each applied is three rows).
  const history = (q) => page.evaluate(async ({ q, token }) => {
    const r = await fetch(`/api/ledger/history?${q}`, { headers: { authorization: `Bearer ${token}` } });
    if (!r.ok) throw new Error(`history ${q}: ${r.status}`);
    return r.json();
  }, { q, token: adminJwt });
  for (let i = 0; i < 14; i++) {
    const ok = await page.evaluate(async ({ pct, token }) => (await fetch("/api/control/module/mev:throttle", {
      method: "POST", body: JSON.stringify({ throttle_pct: Number(pct) }),
      headers: { authorization: `Bearer ${token}`, "content-type": "application/json", "idempotency-key": crypto.randomUUID() },
    })).ok, { pct, token: adminJwt });
    check(ok, "a JSON throttle to top the ledger up");
  }
  const key = (d) => `${d.chain_id}#${d.seq}`;
  const shownKeys = () => page.locator("#decisions tbody tr").evaluateAll((rows) => rows.map((r) => r.dataset.key));
  await page.selectOption("#ledger-size", "20");
  await page.locator("#ledger-page", { hasText: "newest 20, live" }).waitFor();
  check(await page.locator("#ledger-newer").isDisabled(), "no newer page while live");
  // The live table takes the stream's decisions: wait until the last of the
  // throttles' rows have come (the table unchanged for a second).
  let page1 = await shownKeys();
  for (let quiet = 0, tries = 0; quiet < 4 && tries < 40; tries++) {
    await page.waitForTimeout(250);
    const now = await shownKeys();
    quiet = JSON.stringify(now) === JSON.stringify(page1) ? quiet + 1 : 0;
    page1 = now;
  }
  await page.click("#ledger-older");
  await page.locator("#ledger-page", { hasText: "page 2: 20" }).waitFor();
  const page2 = await shownKeys();
  // The cursor page 2 starts below: the live table's last decision.
  const cursor = (await page.locator("#decisions").getAttribute("data-before")).split(".");
  const below = `${cursor.slice(2).join(".")}#${cursor[1]}`;
  check(below === page1[page1.length - 1], `page 2 starts below the last decision shown (${below}; ${page1})`);
  await page.click("#ledger-older");
  await page.locator("#ledger-page", { hasText: "page 3:" }).waitFor();
  const page3 = await shownKeys();
  // The pages follow each other in the ledger's own order: no decision skipped,
  // none twice (asked of the API after the pages: a page starts below the last
  // decision shown, so nothing newer cuts in).
  const all = (await history("limit=1000")).map(key);
  const at = all.indexOf(below);
  check(at >= 19, `page 1's last decision is in the ledger (${at})`);
  check(JSON.stringify(page2) === JSON.stringify(all.slice(at + 1, at + 21)),
    `page 2 follows page 1\n page 2 ${page2}\n ledger ${all.slice(at + 1, at + 21)}`);
  check(JSON.stringify(page3) === JSON.stringify(all.slice(at + 21, at + 21 + page3.length)) && page3.length > 0,
    `page 3 follows page 2\n page 3 ${page3}\n ledger ${all.slice(at + 21, at + 41)}`);
  await page.click("#ledger-newer");
  await page.locator("#ledger-page", { hasText: "page 2: 20" }).waitFor();
  check(JSON.stringify(await shownKeys()) === JSON.stringify(page2), "Newer goes back to page 2");
  await page.click("#ledger-newest");
  await page.locator("#ledger-page", { hasText: "live" }).waitFor();
  // Only the applied decisions, asked of the server: the same as the API's.
  await page.selectOption("#ledger-decision", "applied");
  await page.locator("#ledger-page", { hasText: "newest 20, live" }).waitFor();
  const applied = await page.locator("#decisions tbody tr td:nth-child(3)").allInnerTexts();
  check(applied.length === 20 && applied.every((t) => t === "applied"), `only applied decisions: ${applied}`);
  const appliedKeys = await shownKeys();
  const appliedApi = (await history("limit=20&decision=applied")).map(key);
  check(JSON.stringify(appliedKeys) === JSON.stringify(appliedApi),
    `the applied decisions are the API's\n page ${appliedKeys}\n api ${appliedApi}`);
  await page.selectOption("#ledger-decision", "");
  await page.selectOption("#ledger-size", "200");
  await page.locator("#ledger-page", { hasText: "live" }).waitFor();
  log(`the ledger view pages (20 a page, 3 pages, in the ledger's order) and shows only the applied decisions when asked`);

  // Chain verified, charts drawn.
  await page.click("#verify");
  await page.locator("#chain", { hasText: "verified" }).waitFor();
  await page.locator("#codes-chart svg").waitFor();
  await page.waitForTimeout(300);
  await page.screenshot({ path: `${out}/console-laptop.png`, fullPage: true });
  check(await page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth), "no horizontal scroll at 1366 px");

  // ------------------------------------------------------------ phone width
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForTimeout(200);
  check(await page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth + 1), "no horizontal scroll at 390 px");
  await page.screenshot({ path: `${out}/console-phone.png`, fullPage: false });
  log("laptop and phone widths laid out without horizontal scrolling");

  // ------------------------------------------------------------ viewer
  const vp = await newPage({ width: 1280, height: 800 });
  const sockets = [];
  vp.on("websocket", (ws) => {
    const s = { closed: false };
    sockets.push(s);
    ws.on("close", () => { s.closed = true; });
  });
  await vp.goto(`${base}/`);
  await vp.fill("#token", viewerJwt);
  // The form sent twice at once (a double Enter): one login, one stream.
  await vp.evaluate(() => { const f = document.getElementById("login-form"); f.requestSubmit(); f.requestSubmit(); });
  await vp.locator("#live", { hasText: "live" }).waitFor();
  await vp.waitForTimeout(1000);
  check(sockets.filter((s) => !s.closed).length === 1, `one stream open after a double login, not ${sockets.filter((s) => !s.closed).length}`);
  await vp.locator(`.module[data-module=mev] [data-field=throttle_pct]`, { hasText: `${pct}%` }).waitFor();
  check(await vp.locator("#throttle-mev").count() === 0, "a viewer is offered no controls");
  await vp.locator("#modules", { hasText: "Commands need role admin" }).waitFor();
  await vp.locator("#models", { hasText: "need role operator" }).waitFor();
  log("a viewer sees module states from the stream and is offered no controls");

  // ------------------------------------------------------------ logout
  // Nothing of the admin's session is left for the next person at this browser.
  await page.setViewportSize({ width: 1366, height: 900 });
  await page.click("#logout");
  await page.locator("#login").waitFor();
  check((await page.inputValue("#token")) === "", "no token left in the login form after logout");
  check(await page.evaluate(() => sessionStorage.getItem("gw.jwt") === null), "no token kept in the session after logout");
  check((await page.locator("#key-status").innerText()).startsWith("No key imported"), "no key shown as imported after logout");
  check(await page.locator("#stream li").count() === 0 && await page.locator("#decisions tbody tr").count() === 0,
    "no stream or ledger rows left on the page after logout");
  log("logout leaves no token, key, stream or table behind; one stream after a double login");

  check(errors.length === 0, `browser console errors:\n${errors.join("\n")}`);
  log(`ok; screenshots in ${out}`);
} catch (e) {
  console.error(`browser.mjs: ${e.message}`);
  if (errors.length) console.error(errors.join("\n"));
  process.exitCode = 1;
} finally {
  await browser.close();
}
