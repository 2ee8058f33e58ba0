// The real `@microsoft/signalr` client, in node, against a hub through the gateway, for
// tests/signalr.rs. Usage: node signalr_client.js <hub url> <default|LongPolling|ServerSentEvents>
// "default" passes no options at all (negotiate, then WebSockets). Prints one line per step;
// "fail: ..." and exit 1 on anything unexpected.
"use strict";
const signalR = require("@microsoft/signalr");

const [url, mode] = process.argv.slice(2);
const fail = (why) => {
  console.log(`fail: ${why}`);
  process.exit(1);
};
setTimeout(() => fail("timed out"), 30000).unref();

async function main() {
  const transports = {
    LongPolling: signalR.HttpTransportType.LongPolling,
    ServerSentEvents: signalR.HttpTransportType.ServerSentEvents,
  };
  const builder = new signalR.HubConnectionBuilder().configureLogging(signalR.LogLevel.Warning);
  const connection = (
    mode === "default" ? builder.withUrl(url) : builder.withUrl(url, { transport: transports[mode] })
  ).build();
  const received = new Promise((resolve) => connection.on("receive", resolve));
  await connection.start();
  console.log(`connected ${connection.connection.transport.constructor.name}`);
  const echoed = await connection.invoke("Echo", "hello");
  if (echoed !== "hello") fail(`Echo returned ${JSON.stringify(echoed)}`);
  console.log("invoke ok");
  await connection.send("Push", "pushed");
  const pushed = await received;
  if (pushed !== "pushed") fail(`receive got ${JSON.stringify(pushed)}`);
  console.log("push ok");
  await connection.stop();
  console.log("stopped");
  process.exit(0);
}

main().catch((e) => fail(e && e.stack ? e.stack : String(e)));
