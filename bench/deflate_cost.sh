#!/bin/bash
# Instructions per 1 KiB JSON message of permessage-deflate's parts, under callgrind (counts are
# the same on a busy machine): each mode of `deflate-cost` (bench/src/bin/deflate-cost.rs) run
# with N=1000 and N=3000 messages, the difference of the totals divided by 2000.
#
# usage: bench/deflate_cost.sh [MODE:LEVEL ...]   (default: the table in docs/performance.md)
# env: BIN (default target/release/deflate-cost), SIZE (default 1024), OUT (default target/deflate-cost)
# Needs valgrind and `cargo build --release -p framegate-bench --bin deflate-cost`.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN=${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/deflate-cost}
OUT=${OUT:-${CARGO_TARGET_DIR:-$ROOT/target}/deflate-cost}
SIZE=${SIZE:-1024}
mkdir -p "$OUT"
if [ $# -eq 0 ]; then
    set -- none:6 reset:6 dreset:6 inflate:6 \
        compress:1 compress:2 compress:3 compress:4 compress:6 compress:9 \
        gw-deflate:1 gw-deflate:2 gw-deflate:6 gw-inflate:6
fi
# callgrind counts each byte a `rep stosb` stores as an instruction, and glibc's memset clears
# large blocks with it: its share is reported apart, as bytes cleared (a CPU clears 32 to 64
# bytes a cycle that way).
count() {  # mode level n -> "total memset"
    local f="$OUT/$1-${2//\//_}-$3"
    valgrind --tool=callgrind --callgrind-out-file="$f.cg" "$BIN" "$1" "$2" "$3" "$SIZE" \
        >/dev/null 2>"$f.log"
    echo "$(sed -n 's/^summary: //p' "$f.cg") $(callgrind_annotate "$f.cg" 2>/dev/null \
        | awk '/__memset/ {gsub(",", "", $1); print $1; found=1; exit} END {if (!found) print 0}')"
}
for spec in "$@"; do
    mode=${spec%%:*}; level=${spec#*:}
    read -r a ma <<<"$(count "$mode" "$level" 1000)"
    read -r b mb <<<"$(count "$mode" "$level" 3000)"
    echo "$mode $level: $(( (b - a) / 2000 )) instructions per $SIZE-byte message," \
        "of which memset $(( (mb - ma) / 2000 )), other $(( (b - a - mb + ma) / 2000 ))"
done
