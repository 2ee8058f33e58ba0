// Several real `socket.io-client`s with default transports (polling, then the upgrade to
// WebSocket) through a gateway route on a pool of Socket.IO servers with a sticky cookie,
// for tests/socketio.rs. `withCredentials: true` gives the Node client its cookie jar, so
// it sends the gateway's cookie back on each poll and on the WebSocket upgrade, as a browser
// does. Without stickiness the polls of one session reach a server that does not know it
// ("Session ID unknown") and the client never connects.
// Usage: node socketio_sticky.js <gateway url> <clients>
// Prints "client <i> <transport> <server port>" per client, then "done"; "fail: ..." and
// exit 1 on anything unexpected.
"use strict";
const { io } = require("socket.io-client");

const [url, count] = [process.argv[2], Number(process.argv[3] || 4)];
const fail = (why) => {
  console.log(`fail: ${why}`);
  process.exit(1);
};
setTimeout(() => fail("timed out"), 30000).unref();

const once = (emitter, event) => new Promise((resolve) => emitter.once(event, resolve));

async function one(i) {
  // No reconnection: a session that breaks must fail the test, not be retried elsewhere.
  const socket = io(url, { withCredentials: true, reconnection: false, forceNew: true });
  socket.on("connect_error", (e) => fail(`client ${i}: ${e.message}`));
  // The transport it opened with, and its upgrade, watched from the open on: the upgrade
  // may be over before Socket.IO's own "connect".
  let first;
  const upgraded = new Promise((resolve) =>
    socket.io.once("open", () => {
      first = socket.io.engine.transport.name;
      socket.io.engine.once("upgrade", (t) => resolve(t.name));
    }),
  );
  await once(socket, "connect");
  if (first !== "polling") fail(`client ${i} opened with ${first}`);
  // Acks over the session (polls and posts until the upgrade, then the WebSocket).
  for (let k = 0; k < 3; k++) {
    const sum = await socket.timeout(5000).emitWithAck("add", i, k);
    if (sum !== i + k) fail(`client ${i}: ack gave ${sum}`);
  }
  const transport = await upgraded;
  const back = once(socket, "echo");
  socket.emit("echo", `hello ${i}`);
  if ((await back) !== `hello ${i}`) fail(`client ${i}: bad echo`);
  const port = await socket.timeout(5000).emitWithAck("whoami");
  return { socket, line: `client ${i} ${transport} ${port}` };
}

async function main() {
  // One after the other: the round robin then gives each server every other client.
  const done = [];
  for (let i = 0; i < count; i++) done.push(await one(i));
  for (const { line } of done) console.log(line);
  for (const { socket } of done) socket.close();
  console.log("done");
}

main().catch((e) => fail(e && e.stack ? e.stack : String(e)));
