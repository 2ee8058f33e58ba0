// The real `socket.io-client` with its default transports (polling first, then the upgrade to
// WebSocket) against a Socket.IO server through the gateway, for tests/socketio.rs.
// Usage: node socketio_client.js <gateway url>
// Prints one line per step; "fail: ..." and exit 1 on anything unexpected. After "wait
// restart" it waits for the server to go away and come back (the test restarts it), then
// prints "reconnected" and echoes once more.
"use strict";
const { io } = require("socket.io-client");

const url = process.argv[2];
const fail = (why) => {
  console.log(`fail: ${why}`);
  process.exit(1);
};
setTimeout(() => fail("timed out"), 30000).unref();

const once = (emitter, event) => new Promise((resolve) => emitter.once(event, resolve));

async function echo(socket, payload) {
  const back = once(socket, "echo");
  socket.emit("echo", payload);
  return back;
}

async function main() {
  const socket = io(url, { reconnectionDelay: 100, reconnectionDelayMax: 500 });
  // The engine's transport when it opened, and its upgrade, watched from the open on: the
  // upgrade may be over before Socket.IO's own "connect" arrives.
  let first;
  const upgraded = new Promise((resolve) =>
    socket.io.once("open", () => {
      first = socket.io.engine.transport.name;
      socket.io.engine.once("upgrade", (transport) => resolve(transport.name));
    }),
  );
  await once(socket, "connect");
  console.log(`connected ${first}`);
  console.log(`upgraded ${await upgraded}`);

  const text = await echo(socket, "hello");
  if (text !== "hello") fail(`echo gave ${JSON.stringify(text)}`);
  console.log("echo ok");

  const sum = await socket.timeout(5000).emitWithAck("add", 2, 3);
  if (sum !== 5) fail(`ack gave ${sum}`);
  console.log("ack ok");

  const bytes = Buffer.from([0, 1, 2, 253, 254, 255]);
  const back = await echo(socket, bytes);
  if (!Buffer.isBuffer(back) || !back.equals(bytes)) fail(`binary echo gave ${back}`);
  console.log("binary ok");

  console.log("wait restart");
  await once(socket, "disconnect");
  console.log("disconnected");
  await once(socket.io, "reconnect");
  console.log(`reconnected ${socket.io.engine.transport.name}`);
  const again = await echo(socket, "again");
  if (again !== "again") fail(`echo after the restart gave ${JSON.stringify(again)}`);
  console.log("echo ok");
  socket.close();
  console.log("done");
}

main().catch((e) => fail(e && e.stack ? e.stack : String(e)));
