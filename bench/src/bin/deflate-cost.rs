//! Instructions per message of the gateway's permessage-deflate codec (src/proxy/deflate.rs,
//! compiled here from the gateway's own source) and of its parts, for callgrind, whose counts
//! do not depend on how busy the machine is. Each mode does one thing `N` times over 64
//! different 1 KiB JSON messages (`deflate_load::json_records`, what `fg-load --deflate`
//! sends); run each mode with two `N`s and divide the difference by the difference of the
//! `N`s, so that set-up and start-up cancel out:
//!
//! ```sh
//! cargo build --release -p framegate-bench --bin deflate-cost
//! for n in 1000 3000; do valgrind --tool=callgrind --callgrind-out-file=/tmp/dc.$n \
//!     target/release/deflate-cost compress 6 $n; done
//! bench/deflate_cost.sh    # every mode, as docs/performance.md reports them
//! ```
//!
//! Modes (`deflate-cost MODE LEVEL N [SIZE]`):
//! - `none`: the messages only (the baseline; its difference should be 0);
//! - `compress`: flate2's compressor at LEVEL (zlib's memLevel 8), a sync flush, then `reset()`,
//!   as the gateway did until the twelfth session;
//! - `reset`: `reset()` only, on a compressor at LEVEL (zlib-rs clears its hash table);
//! - `inflate`: the thread decompressor, the message (compressed at LEVEL) then `reset()`;
//! - `dreset`: the decompressor's `reset()` only;
//! - `zcompress`: zlib-rs's compressor at LEVEL given as `L/M/S` (level, memLevel, strategy d,
//!   f, h or r: default, fixed codes, Huffman only, run-length), a sync flush, then `reset()`;
//! - `gw-deflate`: the gateway's `Deflater` (a fresh window per message) at LEVEL;
//! - `gw-inflate`: the gateway's `Inflater` (a peer that resets) of messages compressed at LEVEL;
//! - `sizes`: prints the compressed size at each level (no callgrind needed); `zsizes`: the
//!   same for one `L/M/S`.
#![allow(dead_code)]

use std::hint::black_box;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use framegate_bench::deflate_load::json_records;

// The gateway's codec, compiled from its own source (`super::extensions` there is this crate's
// root here).
#[path = "../../../src/proxy/deflate.rs"]
mod deflate;
#[path = "../../../src/proxy/extensions.rs"]
mod extensions;

use deflate::{Deflater, Inflater};
use extensions::{Agreed, Sending};

const VARIANTS: usize = 64;

/// What a browser's leg agrees through the gateway by default (no context takeover), with
/// every message compressed at `level`.
fn agreed(level: u8) -> Agreed {
    Agreed {
        peer_resets: true,
        gateway_resets: true,
        peer_window_bits: 15,
        gateway_window_bits: 15,
        sending: Sending {
            level,
            threshold: 0,
        },
    }
}

fn compressor(level: u32) -> Compress {
    Compress::new_with_window_bits(Compression::new(level), false, 15)
}

/// One message compressed with a sync flush, as the gateway does (tail kept: the mode
/// `inflate` feeds it whole).
fn compress(c: &mut Compress, m: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(m.len() + 64);
    let _ = c.compress_vec(m, out, FlushCompress::Sync);
}

/// zlib-rs's compressor for "LEVEL/MEMLEVEL/STRATEGY" (strategy d, f, h or r: default, fixed
/// codes, Huffman only, run-length).
fn zcompressor(spec: &str) -> zlib_rs::Deflate {
    let mut parts = spec.split('/');
    let level = parts.next().and_then(|p| p.parse().ok()).unwrap_or(6);
    let mem_level = parts.next().and_then(|p| p.parse().ok()).unwrap_or(8);
    let strategy = match parts.next() {
        Some("f") => zlib_rs::Strategy::Fixed,
        Some("h") => zlib_rs::Strategy::HuffmanOnly,
        Some("r") => zlib_rs::Strategy::Rle,
        _ => zlib_rs::Strategy::Default,
    };
    zlib_rs::Deflate::new_with_config(zlib_rs::DeflateConfig {
        level,
        method: zlib_rs::Method::Deflated,
        window_bits: -15,
        mem_level,
        strategy,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: deflate-cost none|compress|zcompress|reset|inflate|dreset|gw-deflate|gw-inflate|sizes|zsizes LEVEL N [SIZE]";
    let mode = args.get(1).expect(usage).as_str();
    let level: u32 = args
        .get(2)
        .and_then(|a| a.split('/').next()?.parse().ok())
        .expect(usage);
    let n: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(0);
    let size: usize = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let messages: Vec<Vec<u8>> = (0..VARIANTS)
        .map(|s| json_records(size, s as u64))
        .collect();
    let mut out = Vec::with_capacity(size * 2 + 64);
    let mut c = compressor(level);
    let compressed: Vec<Vec<u8>> = messages
        .iter()
        .map(|m| {
            compress(&mut c, m, &mut out);
            c.reset();
            out.clone()
        })
        .collect();
    let mut d = Decompress::new(false);
    let mut total = 0usize;
    match mode {
        "none" => {
            for i in 0..n {
                total += black_box(&messages[i % VARIANTS]).len();
            }
        }
        "compress" => {
            for i in 0..n {
                compress(&mut c, &messages[i % VARIANTS], &mut out);
                c.reset();
                total += out.len();
            }
        }
        "reset" => {
            for _ in 0..n {
                black_box(&mut c).reset();
            }
        }
        "inflate" => {
            for i in 0..n {
                out.clear();
                let _ =
                    d.decompress_vec(&compressed[i % VARIANTS], &mut out, FlushDecompress::Sync);
                d.reset(false);
                total += out.len();
            }
        }
        "dreset" => {
            for _ in 0..n {
                black_box(&mut d).reset(false);
            }
        }
        "gw-deflate" => {
            let mut deflater = Deflater::new(agreed(level as u8)).expect("a level above 0");
            for i in 0..n {
                total += deflater
                    .deflate(&messages[i % VARIANTS], |c| c.len())
                    .unwrap_or(0);
            }
        }
        "gw-inflate" => {
            let mut inflater = Inflater::new(agreed(level as u8));
            let wire: Vec<&[u8]> = compressed.iter().map(|c| &c[..c.len() - 4]).collect();
            for i in 0..n {
                total += inflater
                    .inflate(wire[i % VARIANTS], 1 << 20)
                    .map_or(0, |m| m.len());
            }
        }
        "zcompress" => {
            let mut z = zcompressor(&args[2]);
            for i in 0..n {
                let m = &messages[i % VARIANTS];
                out.clear();
                out.resize(m.len() + 64, 0);
                let before = z.total_out();
                let _ = z.compress(m, &mut out, zlib_rs::DeflateFlush::SyncFlush);
                total += (z.total_out() - before) as usize;
                z.reset();
            }
        }
        "zsizes" => {
            let mut z = zcompressor(&args[2]);
            let sum: usize = messages
                .iter()
                .map(|m| {
                    out.clear();
                    out.resize(m.len() + 64, 0);
                    let before = z.total_out();
                    let _ = z.compress(m, &mut out, zlib_rs::DeflateFlush::SyncFlush);
                    let n = (z.total_out() - before) as usize;
                    z.reset();
                    n - 4
                })
                .sum();
            println!(
                "{}: {} bytes per {size}-byte message",
                args[2],
                sum / VARIANTS
            );
        }
        "sizes" => {
            for level in 0..=9 {
                let mut c = compressor(level);
                let sum: usize = messages
                    .iter()
                    .map(|m| {
                        compress(&mut c, m, &mut out);
                        c.reset();
                        out.len() - 4
                    })
                    .sum();
                println!(
                    "level {level}: {} bytes per {size}-byte message",
                    sum / VARIANTS
                );
            }
        }
        _ => panic!("{usage}"),
    }
    println!("{mode} level {level} n {n}: {total}");
}
