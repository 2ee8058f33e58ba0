//! The permessage-deflate codec (RFC 7692 §7.2): a message's payload compressed with raw
//! DEFLATE and a sync flush, without the trailing `00 00 ff ff`, and inflated back under the
//! route's `max_message_size`.
//!
//! One reason to change: how payloads are compressed and inflated. Negotiation is
//! `extensions.rs`; the framing (RSV1 on the first frame) is the legs'.
//!
//! Memory (zlib-rs, through flate2; see docs/configuration.md for measured figures): a
//! compressor holds its window twice over plus hash tables and a pending buffer, a
//! decompressor its window plus a few KiB. A leg whose peer resets its window after each
//! message, or whose gateway side does, needs no state between messages: it uses its worker
//! thread's compressor or decompressor, reset after each message, so an idle connection holds
//! none. Only a window kept from message to message (context takeover) costs a connection
//! its own.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::extensions::Agreed;

/// What a sync flush ends with, removed by the sender and put back by the receiver.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The largest buffer the thread keeps between messages for compressed output.
const KEEP_SCRATCH: usize = 256 * 1024;

thread_local! {
    /// The worker thread's compressors for legs that keep no window, one per window size
    /// (9 to 15 bits), reset after each message.
    static COMPRESSORS: RefCell<[Option<Compress>; 7]> = const { RefCell::new([const { None }; 7]) };
    /// Its decompressor, likewise.
    static DECOMPRESSOR: RefCell<Option<Decompress>> = const { RefCell::new(None) };
    /// Compressed output on its way into a frame.
    static OUTPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A raw DEFLATE compressor with a window of `bits` (9 to 15).
fn new_compressor(bits: u8) -> Compress {
    Compress::new_with_window_bits(Compression::default(), false, bits.clamp(9, 15))
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
pub(crate) enum Deflater {
    /// A fresh window for each message, with the thread's compressor for this window size.
    Fresh(u8),
    /// The window kept from message to message: this leg's own compressor.
    Kept(Box<Compress>),
}

impl Deflater {
    pub(crate) fn new(agreed: Agreed) -> Self {
        let bits = agreed.gateway_window_bits.clamp(9, 15);
        if agreed.gateway_resets {
            Deflater::Fresh(bits)
        } else {
            Deflater::Kept(Box::new(new_compressor(bits)))
        }
    }

    /// Compresses `payload` and hands the result (without the sync tail) to `encode`.
    pub(crate) fn deflate<R>(&mut self, payload: &[u8], encode: impl FnOnce(&[u8]) -> R) -> R {
        OUTPUT.with(|output| {
            let mut output = output.borrow_mut();
            output.clear();
            match self {
                Deflater::Kept(compressor) => compress(compressor, payload, &mut output),
                Deflater::Fresh(bits) => COMPRESSORS.with(|c| {
                    let mut c = c.borrow_mut();
                    let compressor =
                        c[usize::from(*bits - 9)].get_or_insert_with(|| new_compressor(*bits));
                    compress(compressor, payload, &mut output);
                    compressor.reset();
                }),
            }
            let result = encode(&output);
            if output.capacity() > KEEP_SCRATCH {
                *output = Vec::new();
            }
            result
        })
    }
}

/// Compresses `payload` into `out` with a sync flush, then removes the flush's tail
/// (RFC 7692 §7.2.1). An empty result is sent as a single `00` (§7.2.3.6).
fn compress(compressor: &mut Compress, payload: &[u8], out: &mut Vec<u8>) {
    out.reserve(payload.len() / 2 + 64);
    let mut at = 0;
    loop {
        let before = compressor.total_in();
        // Only fails on a stream-end misuse, which a sync flush never makes.
        let _ = compressor.compress_vec(&payload[at..], out, FlushCompress::Sync);
        at += (compressor.total_in() - before) as usize;
        // Done when all input is in and the flush fitted (room was left).
        if at == payload.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(4096));
    }
    if out.ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    }
    if out.is_empty() {
        out.push(0);
    }
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

    const RESET: Agreed = Agreed {
        peer_resets: true,
        gateway_resets: true,
        peer_window_bits: 15,
        gateway_window_bits: 15,
    };
    const KEEP: Agreed = Agreed {
        peer_resets: false,
        gateway_resets: false,
        peer_window_bits: 15,
        gateway_window_bits: 15,
    };

    fn round_trip(agreed: Agreed, messages: &[&[u8]]) {
        let mut deflater = Deflater::new(agreed);
        let mut inflater = Inflater::new(agreed);
        for m in messages {
            let wire = deflater.deflate(m, |c| c.to_vec());
            assert!(!wire.ends_with(&TAIL));
            assert_eq!(inflater.inflate(&wire, 1 << 20).unwrap(), *m);
        }
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
        let wire = Deflater::new(RESET).deflate(&zeros, |c| c.to_vec());
        assert!(wire.len() < 100 << 10, "{}", wire.len());
        assert_eq!(
            Inflater::new(RESET).inflate(&wire, 1 << 20),
            Err(InflateError::TooBig)
        );
        // Exactly at the limit is fine.
        let wire = Deflater::new(RESET).deflate(&zeros[..1000], |c| c.to_vec());
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
