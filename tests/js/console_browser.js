// Headless Chromium (the system binary, driven by puppeteer-core; no browser download) using
// the traffic console (GET /console on the admin listener), for tests/console.rs.
// Usage: node console_browser.js <chromium> <admin base URL> <token> <captured route> <plain route>
// With CONSOLE_SCREENSHOTS=<dir>, saves console-*.png there (docs/img/ for docs/console.md).
// Prints "launched <version>", "step <name>" lines as it goes, then one JSON line of what the page showed; "fail: ..." and
// exit 1 on anything unexpected. Every wait awaits something in the page and is bounded; the
// browser is closed in `finally`, and quits by itself if node is killed (it is driven over a
// pipe).
"use strict";
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const puppeteer = require("puppeteer-core");

const [chromium, base, token, capturedRoute, plainRoute] = process.argv.slice(2);
const shots = process.env.CONSOLE_SCREENSHOTS;
const STEP_MS = 8000;
// Progress lines, so that the test's wait for each line stays short and a failure shows where.
const step = (name) => console.log(`step ${name}`);
const fail = (why) => {
  console.log(`fail: ${why}`);
  process.exit(1);
};
setTimeout(() => fail("timed out"), 60000).unref();

// In the page: what each message row shows.
function messageRows() {
  const text = (node) => (node ? node.textContent : null);
  return Array.from(document.querySelectorAll("[data-testid=msg-row]"), (tr) => ({
    seq: Number(tr.dataset.seq),
    direction: tr.dataset.direction,
    type: text(tr.querySelector("[data-testid=msg-type]")),
    decision: tr.dataset.decision,
    mask: text(tr.querySelector("[data-testid=msg-mask]")),
    from: text(tr.querySelector("[data-testid=msg-dir] .from")),
    payload: text(tr.querySelector("[data-testid=msg-payload] [data-testid=payload-text]")),
    kind: tr.querySelector("[data-testid=msg-payload] .payload")?.dataset.kind ?? null,
    no_payload: !!tr.querySelector("[data-testid=no-payload]"),
    before: text(tr.querySelector("[data-testid=msg-before] [data-testid=payload-text]")),
    after: text(tr.querySelector("[data-testid=msg-after] [data-testid=payload-text]")),
    hidden: tr.hidden,
  }));
}

// In the page: true when some row matches every given field (`payload` and `after`: contains).
function hasRow(want) {
  const rows = Array.from(document.querySelectorAll("[data-testid=msg-row]"));
  return rows.some((tr) => {
    const q = (sel) => tr.querySelector(sel)?.textContent ?? "";
    if (want.decision !== undefined && tr.dataset.decision !== want.decision) return false;
    if (want.direction !== undefined && tr.dataset.direction !== want.direction) return false;
    if (want.type !== undefined && tr.dataset.type !== want.type) return false;
    if (want.payload !== undefined && !q("[data-testid=msg-payload]").includes(want.payload)) return false;
    if (want.after !== undefined && !q("[data-testid=msg-after]").includes(want.after)) return false;
    if (want.no_payload && !tr.querySelector("[data-testid=no-payload]")) return false;
    return true;
  });
}

async function main() {
  // Without credentials: 401 with a Basic challenge, so that a browser asks.
  const bare = await fetch(`${base}/console`);
  const unauthenticated = { status: bare.status, www_authenticate: bare.headers.get("www-authenticate") };

  const browser = await puppeteer.launch({
    executablePath: chromium,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--no-first-run"],
    defaultViewport: { width: 1360, height: 860 },
    pipe: true,
    timeout: 20000,
    protocolTimeout: 20000,
  });
  const results = { unauthenticated };
  const downloads = fs.mkdtempSync(path.join(os.tmpdir(), "framegate-console-"));
  try {
    console.log(`launched ${await browser.version()}`);
    const page = await browser.newPage();
    page.setDefaultTimeout(STEP_MS);
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e.message || e)));
    await page.authenticate({ username: "admin", password: token });
    const response = await page.goto(`${base}/console`, { timeout: STEP_MS });
    results.page = { status: response.status(), title: await page.title() };
    const shot = async (name) => {
      if (shots) await page.screenshot({ path: path.join(shots, `console-${name}.png`) });
    };
    const waitFor = (what, fn, ...args) =>
      page.waitForFunction(fn, { timeout: STEP_MS }, ...args).catch((e) => {
        throw new Error(`waiting for ${what}: ${e.message}`);
      });
    const rowOf = (route) =>
      page.evaluate((route) => {
        const tr = Array.from(document.querySelectorAll("[data-testid=conn-row]")).find(
          (r) => r.querySelector("[data-testid=conn-route]").textContent === route,
        );
        if (!tr) return null;
        const cell = (n) => tr.querySelector(`[data-testid=conn-${n}]`).textContent;
        return {
          id: Number(tr.dataset.id),
          hidden: tr.hidden,
          route: cell("route"),
          client: cell("client"),
          upstream: cell("upstream"),
          age: cell("age"),
          msgs: cell("msgs"),
          tags: cell("tags"),
        };
      }, route);
    const connRowShown = (route) =>
      waitFor(
        `the connection on ${route} in the list`,
        (route) =>
          Array.from(document.querySelectorAll("[data-testid=conn-row]")).some(
            (r) => !r.hidden && r.querySelector("[data-testid=conn-route]").textContent === route,
          ),
        route,
      );

    step("list");
    // The list: both test connections appear, polled without a reload.
    await connRowShown(capturedRoute);
    await connRowShown(plainRoute);
    results.row = await rowOf(capturedRoute);

    step("filter");
    // The text filter: a tag value keeps the captured connection and hides the other.
    await page.type("[data-testid=conn-filter]", "console-test");
    await waitFor("the filter to hide the plain connection", (route) =>
      Array.from(document.querySelectorAll("[data-testid=conn-row]")).every(
        (r) => r.hidden === (r.querySelector("[data-testid=conn-route]").textContent === route),
      ), plainRoute);
    results.filter = {
      captured_hidden: (await rowOf(capturedRoute)).hidden,
      plain_hidden: (await rowOf(plainRoute)).hidden,
    };
    await page.$eval("[data-testid=conn-filter]", (i) => {
      i.value = "";
      i.dispatchEvent(new Event("input"));
    });

    step("messages");
    // One connection: its handshake and messages with payloads and decisions.
    await page.click(`[data-testid=conn-row][data-id="${results.row.id}"]`);
    await waitFor("the forwarded JSON message", hasRow, { decision: "forwarded", direction: "client_to_upstream", payload: "hello" });
    await waitFor("the replaced message", hasRow, { decision: "replaced", after: "UP" });
    await waitFor("the dropped message", hasRow, { decision: "dropped", payload: "drop-me" });
    await waitFor("the binary message", hasRow, { type: "binary", direction: "upstream_to_client" });
    results.detail = await page.evaluate(() => {
      const t = (id) => document.querySelector(`[data-testid=${id}]`).textContent;
      const headers = (id) =>
        Array.from(document.querySelectorAll(`[data-testid=${id}] tr`), (tr) =>
          Array.from(tr.children, (c) => c.textContent),
        );
      return {
        id: t("detail-id"),
        state: t("detail-state"),
        capture_mode: document.querySelector("[data-testid=capture-mode]").value,
        request_line: t("request-line"),
        request_headers: headers("request-headers"),
        response_line: t("response-line"),
        response_headers: headers("response-headers"),
      };
    });
    results.messages = await page.evaluate(messageRows);
    await shot("messages");

    step("message-filters");
    // Direction filter: only upstream -> client rows stay visible.
    await page.select("[data-testid=dir-filter]", "upstream_to_client");
    results.direction_filter = (await page.evaluate(messageRows))
      .filter((r) => !r.hidden)
      .map((r) => r.direction);
    await page.select("[data-testid=dir-filter]", "");
    // Type filter: unticking text hides every text row.
    await page.click("[data-testid=type-filter] input[value=text]");
    results.type_filter = (await page.evaluate(messageRows)).filter((r) => !r.hidden).map((r) => r.type);
    await page.click("[data-testid=type-filter] input[value=text]");

    step("pause");
    // Pause: a message sent meanwhile is counted, not shown, until resumed.
    const send = async (to, kind, body) => {
      await page.select("[data-testid=send-to]", to);
      await page.select("[data-testid=send-kind]", kind);
      await page.$eval("[data-testid=send-body]", (i, v) => {
        i.value = v;
      }, body);
      await page.click("[data-testid=send]");
    };
    await page.click("[data-testid=pause]");
    await send("client", "text", "while paused");
    await waitFor("the paused count", () =>
      document.querySelector("[data-testid=paused-count]").textContent.includes("1 new"));
    results.pause = {
      count: await page.$eval("[data-testid=paused-count]", (e) => e.textContent),
      shown_while_paused: await page.evaluate(hasRow, { payload: "while paused" }),
    };
    await page.click("[data-testid=pause]");
    await waitFor("the paused message after resuming", hasRow, { decision: "sent", payload: "while paused" });

    step("send");
    // Send to the upstream: the echo comes back through the gateway.
    await send("upstream", "text", "to the upstream");
    await waitFor("the echo of the message sent upstream", hasRow, {
      decision: "forwarded",
      direction: "upstream_to_client",
      payload: "to the upstream",
    });
    // Markup in a payload is shown as text, never parsed: no element, no script run.
    const markup = '<img src=x onerror="window.injected=1"><b>bold</b>';
    await send("upstream", "text", markup);
    await waitFor("the markup's echo", hasRow, { decision: "forwarded", direction: "upstream_to_client", payload: markup });
    results.markup = await page.evaluate(() => ({
      elements: document.querySelectorAll("[data-testid=messages] img, [data-testid=messages] b").length,
      injected: window.injected === 1,
    }));
    // Binary, from hex.
    await send("client", "binary", "c0 ff ee");
    await waitFor("the binary message sent", hasRow, { decision: "sent", type: "binary", payload: "c0 ff ee" });

    step("capture-mode");
    // Capture mode metadata: new entries have no payload.
    await page.select("[data-testid=capture-mode]", "metadata");
    await waitFor("capture metadata in the status line", () =>
      document.querySelector("[data-testid=status]").textContent.includes("metadata"));
    await send("client", "text", "metadata only");
    await waitFor("a metadata-only entry", hasRow, { decision: "sent", no_payload: true });
    await page.select("[data-testid=capture-mode]", "payload");
    await waitFor("capture payload in the status line", () =>
      document.querySelector("[data-testid=status]").textContent.includes("is payload"));

    step("download");
    // Download: the capture as JSON, saved by the browser.
    const cdp = await browser.target().createCDPSession();
    await cdp.send("Browser.setDownloadBehavior", { behavior: "allow", downloadPath: downloads, eventsEnabled: true });
    const downloaded = new Promise((resolve, reject) => {
      cdp.on("Browser.downloadWillBegin", (e) => {
        results.download = { name: e.suggestedFilename };
      });
      cdp.on("Browser.downloadProgress", (e) => {
        if (e.state === "completed") resolve();
        if (e.state === "canceled") reject(new Error("download canceled"));
      });
    });
    await page.click("[data-testid=download]");
    await Promise.race([
      downloaded,
      new Promise((_, reject) => setTimeout(() => reject(new Error("timed out: download")), STEP_MS)),
    ]);
    const file = fs.readdirSync(downloads)[0];
    const saved = JSON.parse(fs.readFileSync(path.join(downloads, file), "utf8"));
    results.download.file = file;
    results.download.id = saved.id;
    results.download.mode = saved.mode;
    results.download.entries = saved.entries.length;
    results.download.has_password = JSON.stringify(saved).includes("hunter2");

    step("bad-close");
    // A refused close: the API's error text in the status line.
    await page.$eval("[data-testid=close-code]", (i) => {
      i.value = "1005";
    });
    await page.click("[data-testid=close]");
    await waitFor("the refusal in the status line", () =>
      document.querySelector("[data-testid=status]").dataset.kind === "error");
    results.bad_close = await page.$eval("[data-testid=status]", (e) => e.textContent);

    step("close");
    // The close: 4001 kicked, shown as the connection's end.
    await page.$eval("[data-testid=close-code]", (i) => {
      i.value = "4001";
    });
    await page.$eval("[data-testid=close-reason]", (i) => {
      i.value = "kicked";
    });
    await page.click("[data-testid=close]");
    await waitFor("the close notice", () => !document.querySelector("[data-testid=closed]").hidden);
    results.closed = await page.$eval("[data-testid=closed]", (e) => e.textContent);
    results.after_close = await page.evaluate(messageRows);
    await page.$eval(".messages-wrap", (w) => {
      w.scrollTop = w.scrollHeight;
    });
    await shot("closed");

    step("plain");
    // The plain connection: no capture until the console turns it on. The closed connection
    // leaves the list at the next poll, moving the rows below it: click once it has gone, or
    // the click can land where the plain connection's row was a moment before.
    await waitFor("the closed connection to leave the list", (route) =>
      !Array.from(document.querySelectorAll("[data-testid=conn-row]")).some(
        (r) => r.querySelector("[data-testid=conn-route]").textContent === route,
      ), capturedRoute);
    const plainId = (await rowOf(plainRoute)).id;
    await page.click(`[data-testid=conn-row][data-id="${plainId}"]`);
    await waitFor("the plain connection's detail", (id) =>
      document.querySelector("[data-testid=detail-id]").textContent === `#${id}`, plainId);
    await waitFor("the capture-off notice", () =>
      /Capture is off/.test(document.querySelector("[data-testid=msg-empty]").textContent));
    results.plain = {
      before: await page.$eval("[data-testid=msg-empty]", (e) => e.textContent),
    };
    await page.select("[data-testid=capture-mode]", "payload");
    await waitFor("capture on", () =>
      document.querySelector("[data-testid=status]").textContent.includes("is payload"));
    await send("upstream", "text", "late capture");
    await waitFor("the late capture's echo", hasRow, {
      decision: "forwarded",
      direction: "upstream_to_client",
      payload: "late capture",
    });
    results.plain.messages = await page.evaluate(messageRows);
    results.plain.response_line = await page.$eval("[data-testid=response-line]", (e) => e.textContent);

    step("gone");
    // A connection that ends while the pointer is over the list keeps its row, marked closed,
    // so that the rows do not move under the pointer; the row goes when the pointer leaves.
    const plainRow = `[data-testid=conn-row][data-id="${plainId}"]`;
    await page.hover(plainRow);
    const kicked = await page.evaluate(
      (id) => fetch(`/admin/connections/${id}?code=4002&reason=gone`, { method: "DELETE" }).then((r) => r.status),
      plainId,
    );
    await waitFor("the closed connection's row kept under the pointer", (sel) => {
      const tr = document.querySelector(sel);
      return !!tr && tr.classList.contains("gone");
    }, plainRow);
    results.gone = {
      kicked,
      kept: await page.$eval(plainRow, (tr) => ({
        age: tr.querySelector("[data-testid=conn-age]").textContent,
        count: document.querySelector("[data-testid=conn-count]").textContent,
      })),
    };
    await page.mouse.move(1, 1);
    await waitFor("the closed connection's row to go once the pointer has left", (sel) =>
      !document.querySelector(sel), plainRow);
    results.gone.removed = true;
    results.page_errors = errors;
  } finally {
    await browser.close();
    fs.rmSync(downloads, { recursive: true, force: true });
  }
  // Printed once the browser is closed: the test may end everything when it has read this.
  console.log(JSON.stringify(results));
}

main().then(
  () => process.exit(0),
  (e) => fail(e && e.stack ? e.stack.split("\n").slice(0, 2).join(" ") : String(e)),
);
