//! The permessage-deflate codec (RFC 7692 §7.2): a message's payload compressed with raw
//! DEFLATE and a sync flush, without the trailing `00 00 ff ff`, and inflated back under the
//! route's `max_message_size`.
//!
//! One reason to change: how payloads are compressed and inflated. Negotiation is
//! `extensions.rs`; the framing (RSV1 on the first frame) is the legs'.
//!
//! Compressing is zlib-rs's own API (flate2 does not let a compressor choose its memLevel);
//! inflating is flate2's, over the same zlib-rs.
//!
//! Memory (see docs/configuration.md for measured figures): a compressor holds its window
//! twice over, a 128 KiB hash table and a symbol and a pending buffer that its memLevel sizes;
//! a decompressor its window plus a few KiB. A leg whose peer resets its window after each
//! message, or whose gateway side does, needs no state between messages: it uses its worker
//! thread's compressor or decompressor, reset after each message, so an idle connection holds
//! none. Only a window kept from message to message (context takeover) costs a connection
//! its own.
//!
//! CPU (docs/performance.md, "Twelfth session"): per message, a compressor reset clears the
//! hash table and the symbol buffer, and each block's Huffman trees are built and sent; level
//! 1 (zlib-rs's quick strategy, fixed codes) builds none. Messages shorter than the route's
//! threshold, and every message at level 0, are sent uncompressed, at no cost here.

use std::cell::RefCell;

use flate2::{Decompress, FlushDecompress, Status};
use zlib_rs::{Deflate, DeflateConfig, DeflateFlush, Method, Strategy};

use super::extensions::{Agreed, Sending};

/// What a sync flush ends with, removed by the sender and put back by the receiver.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The largest buffer the thread keeps between messages for compressed output.
const KEEP_SCRATCH: usize = 256 * 1024;

/// zlib's memLevel for every compressor: 5 (Python websockets' default) rather than zlib's
/// 8. It sizes the symbol buffer (2^(memLevel+6) symbols, cleared after each block and each
/// reset: 6 KiB instead of 48 KiB) and the pending buffer (8 KiB instead of 64 KiB), so a
/// message's blocks are at most 2,048 symbols long. Measured on JSON: the same size as
/// memLevel 8 to within 1% from 256 bytes to 64 KiB (docs/performance.md).
const MEM_LEVEL: i32 = 5;

/// The levels a compressor can have (1 to 9; 0 compresses nothing) and the window sizes
/// (9 to 15 bits): one thread compressor per pair in use.
const LEVELS: usize = 9;
const WINDOWS: usize = 7;

thread_local! {
    /// The worker thread's compressors for legs that keep no window, one per level and window
    /// size in use, reset after each message.
    static COMPRESSORS: RefCell<[Option<Deflate>; LEVELS * WINDOWS]> =
        const { RefCell::new([const { None }; LEVELS * WINDOWS]) };
    /// Its decompressor, likewise.
    static DECOMPRESSOR: RefCell<Option<Decompress>> = const { RefCell::new(None) };
    /// Compressed output on its way into a frame.
    static OUTPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A raw DEFLATE compressor at `level` (1 to 9) with a window of `bits` (9 to 15).
fn new_compressor(level: u8, bits: u8) -> Deflate {
    Deflate::new_with_config(DeflateConfig {
        level: i32::from(level.clamp(1, 9)),
        method: Method::Deflated,
        // Negative: raw DEFLATE, no zlib header.
        window_bits: -i32::from(bits.clamp(9, 15)),
        mem_level: MEM_LEVEL,
        strategy: Strategy::Default,
    })
}

/// Why a compressed message could not be inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InflateError {
    /// It inflates past the limit: inflating stopped there.
    TooBig,
    /// Not valid DEFLATE data.
    Corrupt,
}

/// The sending side of a leg that agreed permessage-deflate.
pub(crate) struct Deflater {
    /// Messages shorter than this are sent uncompressed.
    threshold: usize,
    compressor: Compressor,
}

/// What compresses a leg's messages.
enum Compressor {
    /// A fresh window for each message, with the thread's compressor for this level and
    /// window size.
    Fresh { level: u8, bits: u8 },
    /// The window kept from message to message: this leg's own compressor.
    Kept(Box<Deflate>),
}

impl Deflater {
    /// `None` at level 0: the leg sends every message uncompressed (and still reads
    /// compressed ones).
    pub(crate) fn new(agreed: Agreed) -> Option<Self> {
        let Sending { level, threshold } = agreed.sending;
        let bits = agreed.gateway_window_bits.clamp(9, 15);
        let compressor = match level.min(9) {
            0 => return None,
            level if agreed.gateway_resets => Compressor::Fresh { level, bits },
            level => Compressor::Kept(Box::new(new_compressor(level, bits))),
        };
        Some(Deflater {
            threshold,
            compressor,
        })
    }

    /// Compresses `payload` and hands the result (without the sync tail) to `encode`, whose
    /// result it returns. `None`: the message is shorter than the threshold and is to be sent
    /// as it is (RSV1 clear); `encode` was not called. RFC 7692 §6 lets a sender choose per
    /// message, and a message sent as it is leaves a kept window as it was, on both sides.
    pub(crate) fn deflate<R>(
        &mut self,
        payload: &[u8],
        encode: impl FnOnce(&[u8]) -> R,
    ) -> Option<R> {
        if payload.len() < self.threshold {
            return None;
        }
        Some(OUTPUT.with(|output| {
            let mut output = output.borrow_mut();
            let len = match &mut self.compressor {
                Compressor::Kept(compressor) => compress(compressor, payload, &mut output),
                Compressor::Fresh { level, bits } => COMPRESSORS.with(|c| {
                    let mut c = c.borrow_mut();
                    let slot = usize::from(*level - 1) * WINDOWS + usize::from(*bits - 9);
                    let compressor = c[slot].get_or_insert_with(|| new_compressor(*level, *bits));
                    let len = compress(compressor, payload, &mut output);
                    compressor.reset();
                    len
                }),
            };
            let result = encode(&output[..len]);
            if output.len() > KEEP_SCRATCH {
                *output = Vec::new();
            }
            result
        }))
    }
}

/// Compresses `payload` into `out` with a sync flush and returns how many bytes of `out` it
/// wrote, without the flush's tail (RFC 7692 §7.2.1); an empty result is a single `00`
/// (§7.2.3.6). `out` is scratch space: its length only grows (zeroed once), so that a message
/// costs no clearing.
fn compress(compressor: &mut Deflate, payload: &[u8], out: &mut Vec<u8>) -> usize {
    let want = payload.len() / 2 + 64;
    if out.len() < want {
        out.resize(want, 0);
    }
    let (mut at, mut written) = (0, 0);
    loop {
        let (before_in, before_out) = (compressor.total_in(), compressor.total_out());
        // Only fails on a stream-end misuse, which a sync flush never makes.
        let _ = compressor.compress(&payload[at..], &mut out[written..], DeflateFlush::SyncFlush);
        at += (compressor.total_in() - before_in) as usize;
        written += (compressor.total_out() - before_out) as usize;
        // Done when all input is in and the flush fitted (room was left).
        if at == payload.len() && written < out.len() {
            break;
        }
        let grow = out.len().max(4096);
        out.resize(out.len() + grow, 0);
    }
    if out[..written].ends_with(&TAIL) {
        written -= TAIL.len();
    }
    if written == 0 {
        out[0] = 0;
        written = 1;
    }
    written
}

/// The receiving side of a leg that agreed permessage-deflate.
pub(crate) enum Inflater {
    /// The peer starts each message with a fresh window: the thread's decompressor (a 15-bit
    /// window reads every smaller one).
    Fresh,
    /// The peer keeps its window: this leg's own decompressor.
    Kept(Box<Decompress>),
}

impl Inflater {
    pub(crate) fn new(agreed: Agreed) -> Self {
        if agreed.peer_resets {
            Inflater::Fresh
        } else {
            let bits = agreed.peer_window_bits.clamp(9, 15);
            Inflater::Kept(Box::new(Decompress::new_with_window_bits(false, bits)))
        }
    }

    /// Inflates one message's `payload`, stopping as soon as it would exceed `limit` bytes.
    pub(crate) fn inflate(
        &mut self,
        payload: &[u8],
        limit: usize,
    ) -> Result<Vec<u8>, InflateError> {
        match self {
            Inflater::Kept(d) => {
                let result = inflate(d, payload, limit);
                // A message that ended its stream (BFINAL) leaves the next one a fresh start.
                if matches!(result, Ok((_, true))) {
                    d.reset(false);
                }
                result.map(|(data, _)| data)
            }
            Inflater::Fresh => DECOMPRESSOR.with(|d| {
                let mut d = d.borrow_mut();
                let d = d.get_or_insert_with(|| Decompress::new(false));
                let result = inflate(d, payload, limit);
                d.reset(false);
                result.map(|(data, _)| data)
            }),
        }
    }
}

/// Inflates `payload` and the sync tail into a buffer grown step by step, never past
/// `limit + 1` bytes: a small message that inflates to gigabytes costs only `limit`. Returns
/// the data and whether the stream ended (a final block).
fn inflate(
    d: &mut Decompress,
    payload: &[u8],
    limit: usize,
) -> Result<(Vec<u8>, bool), InflateError> {
    let cap = limit.saturating_add(1);
    let mut out = Vec::with_capacity(
        payload
            .len()
            .saturating_mul(4)
            .clamp(64, 64 * 1024)
            .min(cap),
    );
    for part in [payload, &TAIL[..]] {
        let mut at = 0;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= cap {
                    return Err(InflateError::TooBig);
                }
                let grow = out.capacity().clamp(4096, 1 << 20).min(cap - out.len());
                out.reserve_exact(grow);
            }
            let (before_in, before_out) = (d.total_in(), out.len());
            let status = d
                .decompress_vec(&part[at..], &mut out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Corrupt)?;
            let consumed = (d.total_in() - before_in) as usize;
            at += consumed;
            if out.len() > limit {
                return Err(InflateError::TooBig);
            }
            if status == Status::StreamEnd {
                return Ok((out, true));
            }
            let room = out.len() < out.capacity();
            if at == part.len() && room {
                break;
            }
            if consumed == 0 && out.len() == before_out && room {
                // No progress with input and room left: the data is cut short or broken.
                return Err(InflateError::Corrupt);
            }
        }
    }
    Ok((out, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every message compressed, at zlib's default level.
    const EVERY: Sending = Sending {
        level: 6,
        threshold: 0,
    };
    const RESET: Agreed = Agreed {
        peer_resets: true,
        gateway_resets: true,
        peer_window_bits: 15,
        gateway_window_bits: 15,
        sending: EVERY,
    };
    const KEEP: Agreed = Agreed {
        peer_resets: false,
        gateway_resets: false,
        peer_window_bits: 15,
        gateway_window_bits: 15,
        sending: EVERY,
    };

    fn deflater(agreed: Agreed) -> Deflater {
        Deflater::new(agreed).expect("a level above 0")
    }

    /// `messages` through a deflater and an inflater that agreed `agreed`; those the deflater
    /// sends as they are skip the inflater, as a receiver reads a frame without RSV1.
    fn round_trip(agreed: Agreed, messages: &[&[u8]]) {
        let mut deflater = deflater(agreed);
        let mut inflater = Inflater::new(agreed);
        for m in messages {
            let Some(wire) = deflater.deflate(m, |c| c.to_vec()) else {
                assert!(m.len() < agreed.sending.threshold);
                continue;
            };
            assert!(!wire.ends_with(&TAIL));
            assert_eq!(inflater.inflate(&wire, 1 << 20).unwrap(), *m);
        }
    }

    #[test]
    fn every_level_round_trips() {
        let json: Vec<u8> = (0..200)
            .flat_map(|i| format!(r#"{{"id":{i},"user":"u{}","ok":true}},"#, i % 7).into_bytes())
            .collect();
        let messages: [&[u8]; 4] = [b"hello", &json, b"", &json[..100]];
        for level in 1..=9 {
            let sending = Sending {
                level,
                threshold: 0,
            };
            round_trip(Agreed { sending, ..RESET }, &messages);
            round_trip(Agreed { sending, ..KEEP }, &messages);
        }
        // Level 1 (fixed codes) still compresses JSON, level 9 at least as well as level 6.
        let size = |level| {
            let agreed = Agreed {
                sending: Sending {
                    level,
                    threshold: 0,
                },
                ..RESET
            };
            deflater(agreed).deflate(&json, |c| c.len()).unwrap()
        };
        assert!(size(1) < json.len() / 2, "{} of {}", size(1), json.len());
        assert!(size(9) <= size(6) && size(6) <= size(1));
    }

    #[test]
    fn short_messages_and_level_0_are_sent_as_they_are() {
        let sending = Sending {
            level: 1,
            threshold: 1024,
        };
        let mut d = deflater(Agreed { sending, ..RESET });
        assert_eq!(d.deflate(&[b'a'; 1023], |c| c.len()), None);
        assert!(d.deflate(&[b'a'; 1024], |c| c.len()).unwrap() < 100);
        // A kept window only holds what was compressed: messages sent as they are, in
        // between, leave both sides' windows as they were.
        let long = [
            b"abcdefgh".repeat(200),
            b"x".repeat(5),
            b"abcdefgh".repeat(300),
        ];
        let messages: Vec<&[u8]> = long.iter().map(|m| &m[..]).collect();
        round_trip(Agreed { sending, ..KEEP }, &messages);
        round_trip(Agreed { sending, ..RESET }, &messages);
        let level0 = Sending {
            level: 0,
            threshold: 0,
        };
        assert!(Deflater::new(Agreed {
            sending: level0,
            ..RESET
        })
        .is_none());
        assert!(Deflater::new(Agreed {
            sending: level0,
            ..KEEP
        })
        .is_none());
    }

    #[test]
    fn messages_round_trip_with_and_without_context_takeover() {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let messages: [&[u8]; 5] = [b"hello", b"", b"hello hello hello", &big, b"hello"];
        round_trip(RESET, &messages);
        round_trip(KEEP, &messages);
        for bits in 9..15 {
            let small = |a: Agreed| Agreed {
                peer_window_bits: bits,
                gateway_window_bits: bits,
                ..a
            };
            round_trip(small(RESET), &messages);
            round_trip(small(KEEP), &messages);
        }
    }

    #[test]
    fn rfc_example_inflates() {
        // RFC 7692 §7.2.3.1: "Hello" compressed.
        let wire = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        assert_eq!(Inflater::new(RESET).inflate(&wire, 100).unwrap(), b"Hello");
        // §7.2.3.2: a kept window; the second "Hello" refers back to the first.
        let mut kept = Inflater::new(KEEP);
        assert_eq!(kept.inflate(&wire, 100).unwrap(), b"Hello");
        assert_eq!(
            kept.inflate(&[0xf2, 0x00, 0x11, 0x00, 0x00], 100).unwrap(),
            b"Hello"
        );
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let zeros = vec![0u8; 50 << 20];
        let wire = deflater(RESET).deflate(&zeros, |c| c.to_vec()).unwrap();
        assert!(wire.len() < 100 << 10, "{}", wire.len());
        assert_eq!(
            Inflater::new(RESET).inflate(&wire, 1 << 20),
            Err(InflateError::TooBig)
        );
        // Exactly at the limit is fine.
        let wire = deflater(RESET)
            .deflate(&zeros[..1000], |c| c.to_vec())
            .unwrap();
        assert_eq!(
            Inflater::new(RESET).inflate(&wire, 1000).unwrap().len(),
            1000
        );
        assert_eq!(
            Inflater::new(RESET).inflate(&wire, 999),
            Err(InflateError::TooBig)
        );
    }

    #[test]
    fn garbage_is_corrupt() {
        assert_eq!(
            Inflater::new(RESET).inflate(&[0xff, 0xff, 0xff, 0xff], 100),
            Err(InflateError::Corrupt)
        );
    }
}
