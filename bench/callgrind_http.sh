#!/bin/bash
# Instructions per proxied HTTP request (`[route] http = "proxy"`), repeatable on a busy
# machine: the release gateway under callgrind with one worker, `fg-load http` (small GETs on
# kept-alive connections, one in flight each) through it to fg-echo's HTTP answer.
#
# The gateway runs twice under callgrind: once with no load (start-up and shutdown), once with
# the load; the difference divided by the requests fg-load counted is the cost per request.
# Then the main parts of the profile (`callgrind_annotate --inclusive=yes`), per request.
#
# usage: bench/callgrind_http.sh NAME [fg-load http args...]
#   e.g. bench/callgrind_http.sh http --connections 4 --duration 5s
# env: FG (the gateway binary; default $BIN/framegate), BIN (fg-load, fg-echo; default
#      target/release), OUT (default target/callgrind)
# Needs valgrind, and `cargo build --release` (framegate, fg-load, fg-echo).
set -euo pipefail
NAME=$1; shift
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN=${BIN:-$ROOT/target/release}
FG=${FG:-$BIN/framegate}
OUT=${OUT:-$ROOT/target/callgrind}
[ $# -gt 0 ] || set -- --connections 4 --duration 5s
mkdir -p "$OUT" && cd "$OUT"
"$BIN/fg-echo" --listen 127.0.0.1:19901 --threads 1 >/dev/null 2>&1 & ECHO=$!
cat > "$NAME.toml" <<T
[server]
listen = ["127.0.0.1:19902"]
workers = 1
[[route]]
path = "/http"
upstream = "ws://127.0.0.1:19901/http"
http = "proxy"
T
# One run of the gateway under callgrind into $1.cg; with $2 = load, fg-load's result in $1.load.
run() {
    NO_COLOR=1 FRAMEGATE_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$1.cg" \
        "$FG" --config "$NAME.toml" run > "$1.log" 2>&1 & GW=$!
    for _ in $(seq 200); do
        python3 -c 'import socket;socket.create_connection(("127.0.0.1",19902),0.2)' 2>/dev/null && break
        sleep 0.2
    done
    if [ "${2:-}" = load ]; then
        "$BIN/fg-load" --url ws://127.0.0.1:19902/ http --warmup 0s "${@:3}" > "$1.load" 2>&1 || true
    fi
    kill -INT $GW; wait $GW || true
}
run "$NAME-idle"
run "$NAME" load "$@"
kill $ECHO; wait $ECHO 2>/dev/null || true
python3 - "$NAME" <<'P'
import re, subprocess, sys
name = sys.argv[1]
load = open(name + ".load").read()
m = re.search(r"requests=(\d+)", load)
if not m:
    sys.exit(f"fg-load counted no requests: {load}")
n = int(m.group(1))
def totals(cg):
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", cg],
                         capture_output=True, text=True).stdout
    total = int(re.search(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", out).group(1).replace(",", ""))
    return total, out
idle, _ = totals(name + "-idle.cg")
total, out = totals(name + ".cg")
print(f"{name}: {n} requests, {(total - idle) / n:.0f} instructions per request "
      f"({total:,} loaded, {idle:,} idle)")
# The main parts, inclusive, per request: each function's own entry ("file:function [binary]").
parts = [
    ("client connection (hyper server + service)", r"framegate::listener::serve::\{\{closure\}\}"),
    ("  hyper Conn::poll_read_head", r"hyper::proto::h1::conn::Conn<I,B,T>::poll_read_head"),
    ("  hyper Conn::write_head", r"hyper::proto::h1::conn::Conn<I,B,T>::write_head"),
    ("  service: Conn::forward", r"framegate::proxy::http::service::Conn::forward::\{\{closure\}\}"),
    ("  service: the request head", r"framegate::client_http::head::of_parts|framegate::proxy::http::service::head_of"),
    ("  service: upstream header map", r"framegate::proxy::headers::upstream_map|framegate::proxy::headers::upstream_fields"),
    ("upstream connection task (hyper client)", r"framegate::proxy::http::upstream::UpstreamConn::connect::\{\{closure\}\}::\{\{closure\}\}"),
    ("  hyper client: parse a head", r"<hyper::proto::h1::role::Client as hyper::proto::h1::Http1Transaction>::parse"),
    ("malloc", r"malloc"),
    ("free", r"free"),
]
for label, pattern in parts:
    m = re.search(r"^\s*([\d,]+) \([\d. ]+%\)\s+\S*:(?:" + pattern + r") \[", out, re.M)
    value = int(m.group(1).replace(",", "")) / n if m else 0
    print(f"  {label:45} {value:8.0f}")
P
