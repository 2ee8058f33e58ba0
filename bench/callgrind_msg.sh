#!/bin/bash
# Instructions per relayed message, repeatable on a busy machine: the release gateway under
# callgrind with one worker, fg-load throughput through it to fg-echo, and the relay's
# inclusive instruction count divided by the messages its close lines report.
#
# usage: bench/callgrind_msg.sh NAME 'EXTRA ROUTE TOML' [fg-load throughput args...]
#   e.g. bench/callgrind_msg.sh payload $'[route.capture]\nmode = "payload"' \
#          throughput --size 1024 --json --connections 1 --inflight 8 --warmup 1s --duration 6s
# env: FG (the gateway binary; default target/release/framegate), OUT (default target/callgrind)
# Needs valgrind, and `cargo build --release` (framegate, fg-load, fg-echo).
set -euo pipefail
NAME=$1; EXTRA=$2; shift 2
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/target/release"
FG=${FG:-$BIN/framegate}
OUT=${OUT:-$ROOT/target/callgrind}
mkdir -p "$OUT" && cd "$OUT"
"$BIN/fg-echo" --listen 127.0.0.1:19901 --threads 1 >/dev/null 2>&1 & ECHO=$!
cat > "$NAME.toml" <<T
[server]
listen = ["127.0.0.1:19902"]
workers = 1
[[route]]
path = "/"
upstream = "ws://127.0.0.1:19901/"
$EXTRA
T
NO_COLOR=1 FRAMEGATE_LOG=info valgrind --tool=callgrind --callgrind-out-file="$NAME.cg" \
    "$FG" --config "$NAME.toml" run > "$NAME.log" 2>&1 & GW=$!
for _ in $(seq 200); do
    python3 -c 'import socket;socket.create_connection(("127.0.0.1",19902),0.2)' 2>/dev/null && break
    sleep 0.2
done
"$BIN/fg-load" --url ws://127.0.0.1:19902/ "$@" > "$NAME.load" 2>&1 || true
kill -INT $GW; wait $GW || true
kill $ECHO; wait $ECHO 2>/dev/null || true
python3 - "$NAME" <<'P'
import re, subprocess, sys
name = sys.argv[1]
log = open(name + ".log").read()
msgs = sum(int(a) + int(b) for a, b in re.findall(r"msgs_in=(\d+) bytes_in=\d+ msgs_out=(\d+)", log))
out = subprocess.run(["callgrind_annotate", "--inclusive=yes", name + ".cg"], capture_output=True, text=True).stdout
m = re.search(r"([\d,]+) \([\d.]+%\)\s+\S*relay.rs:framegate::proxy::relay::Relay::poll_relay", out)
relay = int(m.group(1).replace(",", "")) if m else 0
print(f"{name}: {msgs} messages relayed, {relay / max(msgs, 1):.0f} instructions per message in the relay")
P
