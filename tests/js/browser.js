// Headless Chromium (the system binary, driven by puppeteer-core; no browser download) loading
// a page through the gateway over https:// and opening wss:// from it, for tests/browser.rs.
// Usage: node browser.js <chromium> <https base> <other-origin base> <leaf cert PEM> <token>
// The browser trusts the test certificate by its key: `--ignore-certificate-errors-spki-list`
// with the SHA-256 of the leaf's SubjectPublicKeyInfo, which lets that one key in and no other
// (Chromium on Linux reads extra CAs only from an NSS database, which needs certutil).
// Prints "launched <version>", then one JSON line of what the pages saw; "fail: ..." and
// exit 1 on anything unexpected. Every wait is bounded; the browser is closed in `finally`,
// and quits by itself if node is killed (it is driven over a pipe).
"use strict";
const crypto = require("node:crypto");
const fs = require("node:fs");
const puppeteer = require("puppeteer-core");

const [chromium, base, otherBase, certFile, token] = process.argv.slice(2);
const STEP_MS = 5000;
const fail = (why) => {
  console.log(`fail: ${why}`);
  process.exit(1);
};
setTimeout(() => fail("timed out"), 30000).unref();

const spki = crypto
  .createHash("sha256")
  .update(
    new crypto.X509Certificate(fs.readFileSync(certFile)).publicKey.export({
      type: "spki",
      format: "der",
    }),
  )
  .digest("base64");

// Runs in the page: opens `url`, sends `send` (strings as text, arrays of bytes as binary
// ArrayBuffers), collects the echoes, then closes (or asks the server to, with `closeWith`),
// and reports what the page saw. Every wait is bounded by `stepMs`.
async function inPage({ url, send, closeWith, clientClose, stepMs }) {
  const seen = { origin: location.origin, opened: false, error: false, messages: [] };
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  const closed = new Promise((resolve) => {
    ws.onclose = (e) => resolve({ code: e.code, reason: e.reason, wasClean: e.wasClean });
  });
  ws.onerror = () => {
    seen.error = true;
  };
  const bounded = (p, what) =>
    Promise.race([
      p,
      new Promise((_, reject) => setTimeout(() => reject(new Error(`timed out: ${what}`)), stepMs)),
    ]);
  const opened = new Promise((resolve) => {
    ws.onopen = () => resolve(true);
    closed.then(() => resolve(false));
  });
  seen.opened = await bounded(opened, "open");
  if (seen.opened) {
    for (const m of send) {
      const echo = new Promise((resolve) => {
        ws.onmessage = (e) => resolve(e.data);
      });
      ws.send(typeof m === "string" ? m : new Uint8Array(m).buffer);
      const data = await bounded(echo, "an echo");
      seen.messages.push(typeof data === "string" ? data : Array.from(new Uint8Array(data)));
    }
    if (closeWith) ws.send(closeWith);
    if (clientClose) ws.close(clientClose.code, clientClose.reason);
  }
  seen.close = await bounded(closed, "the close");
  return seen;
}

async function main() {
  const browser = await puppeteer.launch({
    executablePath: chromium,
    headless: true,
    args: [
      "--no-sandbox",
      `--ignore-certificate-errors-spki-list=${spki}`,
      "--disable-gpu",
      "--no-first-run",
    ],
    // Over a pipe, not a debugging port: when node ends (even killed), the pipe closes and
    // Chromium quits with it, so no browser outlives the test.
    pipe: true,
    timeout: 20000,
    protocolTimeout: 20000,
  });
  let results;
  try {
    console.log(`launched ${await browser.version()}`);
    const page = await browser.newPage();
    page.setDefaultTimeout(STEP_MS);
    const response = await page.goto(`${base}/app/`, { timeout: STEP_MS });
    results = {
      page: { status: response.status(), title: await page.title() },
    };
    const wss = base.replace(/^https:/, "wss:");
    const run = (args) => page.evaluate(inPage, { stepMs: STEP_MS, ...args });
    results.echo = await run({
      url: `${wss}/echo`,
      send: ["hello ☃", [0, 1, 2, 253, 254, 255]],
      closeWith: "close:4001:bye",
    });
    results.client_close = await run({
      url: `${wss}/echo`,
      send: ["once more"],
      clientClose: { code: 4002, reason: "page done" },
    });
    results.no_token = await run({ url: `${wss}/private`, send: [] });
    results.token = await run({
      url: `${wss}/private?access_token=${encodeURIComponent(token)}`,
      send: ["with a token"],
      closeWith: "close:4003:authorized",
    });
    // The same page served from another origin: the echo route's allow-list refuses it.
    const other = await browser.newPage();
    other.setDefaultTimeout(STEP_MS);
    await other.goto(`${otherBase}/app/`, { timeout: STEP_MS });
    results.other_origin = await other.evaluate(inPage, {
      stepMs: STEP_MS,
      url: `${wss}/echo`,
      send: [],
    });
  } finally {
    await browser.close();
  }
  // Printed once the browser is closed: the test may end everything when it has read this.
  console.log(JSON.stringify(results));
}

main().then(
  () => process.exit(0),
  (e) => fail(e && e.stack ? e.stack.split("\n")[0] : String(e)),
);
