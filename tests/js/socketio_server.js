// A real Socket.IO server (the `socket.io` package) for tests/socketio.rs.
// Usage: node socketio_server.js <port>   (0: any free port)
// Prints "listening <port>" once it listens on 127.0.0.1. Events:
//   "echo" (any payload, text or binary): emitted back as "echo";
//   "add" (a, b, ack): acknowledged with a + b;
//   "whoami" (ack): acknowledged with the port it listens on (tests of sticky pools).
"use strict";
const http = require("http");
const { Server } = require("socket.io");

const port = Number(process.argv[2] || 0);
const httpServer = http.createServer();
const io = new Server(httpServer);
io.on("connection", (socket) => {
  socket.on("echo", (payload) => socket.emit("echo", payload));
  socket.on("add", (a, b, ack) => ack(a + b));
  socket.on("whoami", (ack) => ack(httpServer.address().port));
});
httpServer.listen(port, "127.0.0.1", () => {
  console.log(`listening ${httpServer.address().port}`);
});
