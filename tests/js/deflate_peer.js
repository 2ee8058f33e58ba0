// A WebSocket peer with or without permessage-deflate (the `ws` package), for tests/deflate.rs.
//
//   node deflate_peer.js server <deflate 0|1>
//     An echo server on 127.0.0.1 (any free port). Prints "listening <port>", then for each
//     connection "offer <Sec-WebSocket-Extensions of the request>" and "answer <of its 101>"
//     (empty when absent). Every data message is echoed with its type.
//
//   node deflate_peer.js client <url> <deflate 0|1> <steps as JSON>
//     Connects, prints "answer <Sec-WebSocket-Extensions of the 101>", then runs the steps in
//     order and prints every message it receives, then "close <code> <reason>" and exits.
//     Steps: {"text": s} | {"binary": s} | {"zeros": n} (n zero bytes, binary)
//            | {"fragments": [s, ...]} (one text message in several frames)
//            | {"expect": n} (wait until n messages in all have arrived) | {"close": code}
//            | {"repeated": n} (n pseudo-random letters twice, as text)
//     Received messages print as "text <s>" (up to 100 bytes), else "text|binary <length>
//     <sum of the bytes mod 256>".
//   <deflate> may also be "w<bits>": deflate, asking the other side for a window of at most
//   <bits> (a client's server_max_window_bits, with client_max_window_bits offered).
//
// With deflate 1 every message is compressed (threshold 0; ws compresses only messages of
// 1 KiB and more by default).
"use strict";
const { WebSocket, WebSocketServer } = require("ws");

const deflateOptions = { threshold: 0 };

function describe(data, isBinary) {
  let sum = 0;
  for (const b of data) sum = (sum + b) % 256;
  if (!isBinary && data.length <= 100) return `text ${data.toString()}`;
  return `${isBinary ? "binary" : "text"} ${data.length} ${sum}`;
}

// n pseudo-random letters, twice: the second half refers back n bytes, further than a small
// window reaches.
function repeated(n) {
  let x = 12345;
  let s = "";
  for (let i = 0; i < n; i++) {
    x = (x * 1103515245 + 12345) % 2147483648;
    s += String.fromCharCode(97 + (x % 26));
  }
  return s + s;
}

// "1": deflate with ws's defaults (threshold 0); "w<bits>": also asks the other side to
// compress with at most that window (serverMaxWindowBits from a client).
function deflateOption(arg, client) {
  if (arg === "1") return deflateOptions;
  if (arg && arg.startsWith("w")) {
    const bits = Number(arg.slice(1));
    return client
      ? { threshold: 0, serverMaxWindowBits: bits, clientMaxWindowBits: true }
      : { threshold: 0, serverMaxWindowBits: bits };
  }
  return false;
}

const [mode, ...args] = process.argv.slice(2);
if (mode === "server") {
  const deflate = deflateOption(args[0], false);
  const wss = new WebSocketServer({
    host: "127.0.0.1",
    port: 0,
    perMessageDeflate: deflate,
    maxPayload: 256 << 20,
  });
  wss.on("headers", (headers, req) => {
    const answer = headers.find((h) => h.toLowerCase().startsWith("sec-websocket-extensions:"));
    console.log(`offer ${req.headers["sec-websocket-extensions"] || ""}`);
    console.log(`answer ${answer ? answer.split(":").slice(1).join(":").trim() : ""}`);
  });
  wss.on("connection", (ws) => {
    ws.on("message", (data, isBinary) => ws.send(data, { binary: isBinary }));
    ws.on("error", () => {});
  });
  wss.on("listening", () => console.log(`listening ${wss.address().port}`));
} else if (mode === "client") {
  const [url, deflateArg, stepsJson] = args;
  const steps = JSON.parse(stepsJson || "[]");
  const ws = new WebSocket(url, {
    perMessageDeflate: deflateOption(deflateArg, true),
    maxPayload: 256 << 20,
  });
  let received = 0;
  let waiting = null;
  ws.on("upgrade", (res) => {
    console.log(`answer ${res.headers["sec-websocket-extensions"] || ""}`);
  });
  ws.on("unexpected-response", (_req, res) => {
    console.log(`status ${res.statusCode}`);
    process.exit(0);
  });
  ws.on("message", (data, isBinary) => {
    received += 1;
    console.log(describe(data, isBinary));
    if (waiting && received >= waiting.n) {
      const w = waiting;
      waiting = null;
      w.resolve();
    }
  });
  ws.on("close", (code, reason) => {
    console.log(`close ${code} ${reason.toString()}`);
    process.exit(0);
  });
  ws.on("error", (e) => console.log(`error ${e.message}`));
  ws.on("open", async () => {
    for (const step of steps) {
      if (step.text !== undefined) ws.send(step.text);
      else if (step.binary !== undefined) ws.send(Buffer.from(step.binary), { binary: true });
      else if (step.zeros !== undefined) ws.send(Buffer.alloc(step.zeros), { binary: true });
      else if (step.repeated !== undefined) ws.send(repeated(step.repeated));
      else if (step.fragments !== undefined) {
        step.fragments.forEach((f, i) =>
          ws.send(f, { binary: false, fin: i === step.fragments.length - 1 }),
        );
      } else if (step.expect !== undefined) {
        if (received < step.expect) {
          await new Promise((resolve) => (waiting = { n: step.expect, resolve }));
        }
      } else if (step.close !== undefined) ws.close(step.close);
    }
  });
} else {
  console.error("usage: deflate_peer.js server <0|1> | client <url> <0|1> <steps>");
  process.exit(2);
}
