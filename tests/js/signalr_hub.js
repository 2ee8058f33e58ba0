// A small SignalR hub for tests/signalr.rs. There is no .NET on the test machines, so this
// node server speaks SignalR as Microsoft documents it (the ASP.NET Core SignalR
// specifications: TransportProtocols.md and HubProtocol.md) instead of ASP.NET Core:
// - negotiate v1: `POST <hub>/negotiate?negotiateVersion=1` answers a connectionId, a
//   connectionToken and the three transports; the transports then use `<hub>?id=<token>`;
// - transports: WebSockets (upgrade), ServerSentEvents (GET, text/event-stream, one
//   `data:` event per message, sends by POST) and LongPolling (GET polls, answered at once
//   the first time, 200 with queued messages or empty after 5 s; POST sends; DELETE ends the
//   connection and its pending poll gets 204);
// - the JSON hub protocol: records end with the separator 0x1e; the client's handshake
//   `{"protocol":"json","version":1}` is answered `{}`; invocations (type 1), completions
//   (type 3), pings (type 6), close (type 7).
// Hub methods: "Echo"(x) returns x; "Push"(x) makes the hub invoke "receive"(x) on the client.
// Usage: node signalr_hub.js <port>  (0: any); prints "listening <port>".
"use strict";
const http = require("http");
const crypto = require("crypto");
const { WebSocketServer } = require("ws");

const RS = "\x1e";
const connections = new Map();

function newConnection() {
  const token = crypto.randomBytes(16).toString("hex");
  const conn = {
    id: crypto.randomBytes(8).toString("hex"),
    token,
    buffer: "",
    handshaken: false,
    queue: [],
    poll: null,
    firstPoll: true,
    sse: null,
    ws: null,
    closed: false,
  };
  connections.set(token, conn);
  return conn;
}

function send(conn, message) {
  const record = JSON.stringify(message) + RS;
  if (conn.ws) conn.ws.send(record);
  else if (conn.sse) conn.sse.write(`data: ${record}\n\n`);
  else {
    conn.queue.push(record);
    flushPoll(conn);
  }
}

function flushPoll(conn) {
  if (!conn.poll || conn.queue.length === 0) return;
  const { res, timer } = conn.poll;
  conn.poll = null;
  clearTimeout(timer);
  res.writeHead(200, { "content-type": "text/plain" });
  res.end(conn.queue.splice(0).join(""));
}

function receive(conn, text) {
  conn.buffer += text;
  let at;
  while ((at = conn.buffer.indexOf(RS)) >= 0) {
    const record = conn.buffer.slice(0, at);
    conn.buffer = conn.buffer.slice(at + 1);
    if (!conn.handshaken) {
      const hello = JSON.parse(record);
      conn.handshaken = true;
      if (hello.protocol !== "json") {
        send(conn, { error: `protocol ${hello.protocol} is not supported` });
      } else {
        send(conn, {});
      }
      continue;
    }
    const message = JSON.parse(record);
    if (message.type === 1 && message.target === "Echo") {
      if (message.invocationId !== undefined) {
        send(conn, { type: 3, invocationId: message.invocationId, result: message.arguments[0] });
      }
    } else if (message.type === 1 && message.target === "Push") {
      send(conn, { type: 1, target: "receive", arguments: message.arguments });
    } else if (message.type === 7) {
      end(conn);
    }
  }
}

function end(conn) {
  conn.closed = true;
  connections.delete(conn.token);
  if (conn.poll) {
    clearTimeout(conn.poll.timer);
    conn.poll.res.writeHead(204);
    conn.poll.res.end();
    conn.poll = null;
  }
  if (conn.sse) conn.sse.end();
  if (conn.ws) conn.ws.close();
}

function readBody(req) {
  return new Promise((resolve) => {
    const parts = [];
    req.on("data", (d) => parts.push(d));
    req.on("end", () => resolve(Buffer.concat(parts).toString("utf8")));
  });
}

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, "http://hub");
  if (url.pathname.endsWith("/negotiate") && req.method === "POST") {
    await readBody(req);
    const conn = newConnection();
    res.writeHead(200, { "content-type": "application/json" });
    res.end(
      JSON.stringify({
        connectionId: conn.id,
        connectionToken: conn.token,
        negotiateVersion: 1,
        availableTransports: [
          { transport: "WebSockets", transferFormats: ["Text", "Binary"] },
          { transport: "ServerSentEvents", transferFormats: ["Text"] },
          { transport: "LongPolling", transferFormats: ["Text", "Binary"] },
        ],
      }),
    );
    return;
  }
  const conn = connections.get(url.searchParams.get("id"));
  if (!conn) {
    res.writeHead(404, { "content-type": "text/plain" });
    res.end("no such connection");
    return;
  }
  if (req.method === "POST") {
    receive(conn, await readBody(req));
    res.writeHead(200, { "content-type": "text/plain" });
    res.end();
  } else if (req.method === "DELETE") {
    end(conn);
    res.writeHead(202, { "content-type": "text/plain" });
    res.end();
  } else if (req.method === "GET" && (req.headers.accept || "").includes("text/event-stream")) {
    conn.sse = res;
    res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
    res.flushHeaders();
    for (const record of conn.queue.splice(0)) res.write(`data: ${record}\n\n`);
    req.on("close", () => end(conn));
  } else if (req.method === "GET") {
    if (conn.firstPoll) {
      conn.firstPoll = false;
      res.writeHead(200, { "content-type": "text/plain" });
      res.end();
      return;
    }
    const timer = setTimeout(() => {
      conn.poll = null;
      res.writeHead(200, { "content-type": "text/plain" });
      res.end();
    }, 5000);
    conn.poll = { res, timer };
    flushPoll(conn);
  } else {
    res.writeHead(405);
    res.end();
  }
});

const wss = new WebSocketServer({ noServer: true });
server.on("upgrade", (req, socket, head) => {
  const url = new URL(req.url, "http://hub");
  const conn = connections.get(url.searchParams.get("id"));
  if (!conn) {
    socket.end("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    conn.ws = ws;
    ws.on("message", (data) => receive(conn, data.toString("utf8")));
    ws.on("close", () => end(conn));
  });
});

server.listen(Number(process.argv[2] || 0), "127.0.0.1", () => {
  console.log(`listening ${server.address().port}`);
});
