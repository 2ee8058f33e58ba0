// Headless Chromium (the system binary, driven by puppeteer-core) as a WebSocket client that
// offers permessage-deflate, as Chromium does on every connection, for tests/deflate.rs.
// Usage: node deflate_browser.js <chromium> <ws url>
// From a blank page: opens the URL, sends a short text, a long repetitive text and 64 KiB of
// binary, waits for their echoes, closes with 1000, and prints one JSON line: the negotiated
// `extensions`, the echoes (text, or the length and byte sum of binary) and the close code.
// "fail: ..." and exit 1 on anything unexpected; every wait is bounded.
"use strict";
const puppeteer = require("puppeteer-core");

const [chromium, url] = process.argv.slice(2);
const fail = (why) => {
  console.log(`fail: ${why}`);
  process.exit(1);
};
setTimeout(() => fail("timed out"), 30000).unref();

async function inPage(url) {
  const seen = { extensions: null, messages: [], code: null };
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  const closed = new Promise((resolve) => {
    ws.onclose = (e) => {
      seen.code = e.code;
      resolve();
    };
  });
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new Error("websocket error"));
  });
  seen.extensions = ws.extensions;
  const bytes = new Uint8Array(65536).map((_, i) => i % 7);
  const sends = ["hello", "abc".repeat(10000), bytes.buffer];
  const echoes = new Promise((resolve) => {
    ws.onmessage = (e) => {
      if (typeof e.data === "string") {
        seen.messages.push(e.data.length > 100 ? `text ${e.data.length}` : e.data);
      } else {
        const b = new Uint8Array(e.data);
        seen.messages.push(`binary ${b.length} ${b.reduce((s, x) => (s + x) % 256, 0)}`);
      }
      if (seen.messages.length === sends.length) resolve();
    };
  });
  for (const m of sends) ws.send(m);
  await Promise.race([echoes, new Promise((r) => setTimeout(r, 5000))]);
  ws.close(1000);
  await Promise.race([closed, new Promise((r) => setTimeout(r, 5000))]);
  return seen;
}

(async () => {
  const browser = await puppeteer.launch({
    executablePath: chromium,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--no-first-run"],
    // Over a pipe: Chromium quits when node ends, even killed.
    pipe: true,
    timeout: 20000,
    protocolTimeout: 20000,
  });
  try {
    const page = await browser.newPage();
    console.log(JSON.stringify(await page.evaluate(inPage, url)));
  } finally {
    await browser.close();
  }
})().catch((e) => fail(e.message));
