//! `fg-load --deflate`: the compressing client (see fg-load's doc). Each connection offers
//! [`pmd::OFFER`] and, where the server accepts, compresses what it sends and inflates what it
//! gets; where it declines, the same client runs uncompressed, which makes the baseline.
//!
//! The per-message path allocates nothing once its buffers have grown: a connection's frames
//! go out through one reused buffer, its compressor and decompressor are its own and reset
//! after each message (no context takeover), and reads land in one reused buffer. The
//! `connections` mode shares one compressor and decompressor among all its connections instead
//! (each opens, echoes one message and idles), so that 9,000 of them do not cost the load
//! generator 9,000 compressors.

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::pmd::{self, Agreed, Deflater, Event, Inflater, Reader};

/// How many different messages are sent, in turn.
const VARIANTS: usize = 16;

/// The largest message read.
const MAX_MESSAGE: usize = 64 << 20;

/// What every connection of one run shares: where to connect and what to send.
pub struct Load {
    host: String,
    path: String,
    headers: Vec<String>,
    messages: Arc<Vec<Vec<u8>>>,
}

impl Load {
    /// For `url` (`ws://` only), with `headers` ("name: value") on each handshake, and
    /// messages of `size` bytes.
    pub fn new(url: &str, headers: &[String], size: usize) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("ws://")
            .context("--deflate loads ws:// URLs only")?;
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        for h in headers {
            h.split_once(':').context("--header is name: value")?;
        }
        Ok(Self {
            host: host.to_owned(),
            path: if path.is_empty() { "/" } else { path }.to_owned(),
            headers: headers.to_vec(),
            messages: Arc::new(
                (0..VARIANTS as u64)
                    .map(|seed| json_records(size, seed))
                    .collect(),
            ),
        })
    }

    /// `throughput`: `connections`, each keeping `inflight` messages in flight; echoed messages
    /// per second, whether compression was agreed, and the bytes on the wire per message each
    /// way, counted after `warmup` for `duration`. Prints COUNTING when counting starts.
    pub async fn throughput(
        &self,
        connections: usize,
        inflight: usize,
        warmup: Duration,
        duration: Duration,
    ) -> anyhow::Result<()> {
        let received = Arc::new(AtomicU64::new(0));
        let wire_out = Arc::new(AtomicU64::new(0));
        let wire_in = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        let mut compressed = None;
        for _ in 0..connections {
            let mut conn = Conn::open(self, 64 * 1024).await?;
            if *compressed.get_or_insert(conn.agreed.compressed) != conn.agreed.compressed {
                bail!("the server agreed compression on some connections only");
            }
            let (received, wire_out, wire_in, stop) = (
                received.clone(),
                wire_out.clone(),
                wire_in.clone(),
                stop.clone(),
            );
            let messages = self.messages.clone();
            tasks.push(tokio::spawn(async move {
                let mut deflater = Deflater::new(15);
                let mut inflater = Inflater::default();
                let mut out = Vec::with_capacity(64 * 1024);
                let (mut sent, mut next, mut in_flight) = (0, 0, 0);
                while !stop.load(Ordering::Relaxed) {
                    while in_flight < inflight {
                        conn.put(&mut out, &mut deflater, &messages[sent % VARIANTS]);
                        sent += 1;
                        in_flight += 1;
                    }
                    conn.stream.write_all(&out).await?;
                    wire_out.fetch_add(out.len() as u64, Ordering::Relaxed);
                    out.clear();
                    let (got, bytes) = conn
                        .receive(&mut inflater, &mut out, &messages, &mut next)
                        .await?;
                    wire_in.fetch_add(bytes, Ordering::Relaxed);
                    in_flight -= got;
                    received.fetch_add(got as u64, Ordering::Relaxed);
                }
                anyhow::Ok(())
            }));
        }
        tokio::time::sleep(warmup).await;
        let counters = || [&received, &wire_out, &wire_in].map(|c| c.load(Ordering::Relaxed));
        let before = counters();
        println!("COUNTING");
        let started = Instant::now();
        tokio::time::sleep(duration).await;
        let after = counters();
        let elapsed = started.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            if t.is_finished() {
                t.await??;
                bail!("a connection ended during the run");
            }
        }
        let [count, out, into] = [0, 1, 2].map(|i| after[i] - before[i]);
        let per = |bytes: u64| bytes as f64 / count.max(1) as f64;
        println!(
            "msgs_per_sec={:.0} messages={count} compressed={} wire_out_per_msg={:.1} wire_in_per_msg={:.1}",
            count as f64 / elapsed,
            u8::from(compressed == Some(true)),
            per(out),
            per(into),
        );
        Ok(())
    }

    /// `connections`: opens `count` connections (`concurrency` at a time), each echoing one
    /// message, then prints READY and holds them until stdin closes or `hold` ends.
    pub async fn connections(
        &self,
        count: usize,
        concurrency: usize,
        hold: Duration,
    ) -> anyhow::Result<()> {
        let deflater = RefCell::new(Deflater::new(15));
        let inflater = RefCell::new(Inflater::default());
        let (deflater, inflater) = (&deflater, &inflater);
        let one = |_| async move {
            let mut inflater = inflater;
            let mut conn = Conn::open(self, 4096).await?;
            let mut out = Vec::new();
            conn.put(&mut out, &mut deflater.borrow_mut(), &self.messages[0]);
            conn.stream.write_all(&out).await?;
            out.clear();
            conn.receive(&mut inflater, &mut out, &self.messages, &mut 0)
                .await?;
            anyhow::Ok((conn.stream, conn.agreed.compressed))
        };
        let started = Instant::now();
        let mut open = Vec::with_capacity(count);
        let mut pending = futures_util::stream::iter(0..count)
            .map(one)
            .buffer_unordered(concurrency.max(1));
        let mut compressed = 0;
        while let Some(result) = pending.next().await {
            let (stream, agreed) =
                result.with_context(|| format!("connection {} failed", open.len() + 1))?;
            compressed += usize::from(agreed);
            open.push(stream);
        }
        println!(
            "handshakes_per_sec={:.0} open={} compressed={compressed}",
            count as f64 / started.elapsed().as_secs_f64(),
            open.len()
        );
        println!("READY");
        // Hold until stdin closes (the orchestrator is done measuring) or the hold time ends.
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(hold, async {
            while stdin.read(&mut buf).await.map(|n| n > 0).unwrap_or(false) {}
        })
        .await;
        Ok(())
    }
}

/// One connection: its socket, what arrived and what was agreed.
struct Conn {
    stream: TcpStream,
    reader: Reader,
    agreed: Agreed,
    /// xorshift state for the masking keys.
    mask: u32,
}

impl Conn {
    async fn open(load: &Load, read_capacity: usize) -> anyhow::Result<Conn> {
        let mut stream = TcpStream::connect(&load.host).await?;
        stream.set_nodelay(true)?;
        let mut reader = Reader::new(read_capacity, MAX_MESSAGE);
        let agreed = pmd::connect(
            &mut stream,
            &mut reader.buf,
            &load.host,
            &load.path,
            &load.headers,
            true,
        )
        .await?;
        let mask = stream.local_addr()?.port() as u32 | 0x9e37_0000;
        Ok(Conn {
            stream,
            reader,
            agreed,
            mask,
        })
    }

    fn next_mask(&mut self) -> [u8; 4] {
        self.mask ^= self.mask << 13;
        self.mask ^= self.mask >> 17;
        self.mask ^= self.mask << 5;
        self.mask.to_ne_bytes()
    }

    /// Appends `message` to `out` as one text frame, compressed when agreed.
    fn put(&mut self, out: &mut Vec<u8>, deflater: &mut Deflater, message: &[u8]) {
        let mask = Some(self.next_mask());
        if self.agreed.compressed {
            pmd::put_frame(out, pmd::TEXT, true, deflater.deflate(message), mask);
        } else {
            pmd::put_frame(out, pmd::TEXT, false, message, mask);
        }
    }

    /// Reads until at least one message has come, checking each against the one sent in the
    /// same turn (`next` counts them); pongs for pings go to `out`, to be sent with the next
    /// messages. Returns how many messages came and how many bytes were read.
    async fn receive(
        &mut self,
        inflater: &mut impl UseInflater,
        out: &mut Vec<u8>,
        messages: &[Vec<u8>],
        next: &mut usize,
    ) -> anyhow::Result<(usize, u64)> {
        let (mut got, mut bytes) = (0, 0);
        let agreed = self.agreed;
        while got == 0 {
            let n = self.stream.read_buf(&mut self.reader.buf).await?;
            if n == 0 {
                bail!("the server closed the connection");
            }
            bytes += n as u64;
            let mask = Some(self.next_mask());
            inflater.with(|inflater| {
                self.reader.drain(|event| match event {
                    Event::Message {
                        opcode,
                        compressed,
                        payload,
                    } => {
                        let data = match compressed {
                            true if agreed.compressed => {
                                inflater.inflate(payload, agreed.peer_resets, MAX_MESSAGE)?
                            }
                            true => return Err(invalid("a compressed message, not agreed")),
                            false => payload,
                        };
                        if opcode != pmd::TEXT || data != messages[*next % VARIANTS] {
                            return Err(invalid(format!(
                                "echo {} differs from what was sent ({} bytes, {} expected)",
                                *next,
                                data.len(),
                                messages[*next % VARIANTS].len()
                            )));
                        }
                        *next += 1;
                        got += 1;
                        Ok(())
                    }
                    Event::Ping(payload) => {
                        pmd::put_frame(out, pmd::PONG, false, payload, mask);
                        Ok(())
                    }
                    Event::Close(_) => Err(invalid("the server closed the connection")),
                })
            })?;
        }
        Ok((got, bytes))
    }
}

/// The decompressor a connection uses: its own, or one that many share (`connections`),
/// borrowed only between awaits.
trait UseInflater {
    fn with<R>(&mut self, f: impl FnOnce(&mut Inflater) -> R) -> R;
}

impl UseInflater for Inflater {
    fn with<R>(&mut self, f: impl FnOnce(&mut Inflater) -> R) -> R {
        f(self)
    }
}

impl UseInflater for &RefCell<Inflater> {
    fn with<R>(&mut self, f: impl FnOnce(&mut Inflater) -> R) -> R {
        f(&mut self.borrow_mut())
    }
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// xorshift64*: a fixed, cheap sequence for the messages' contents.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[(self.next() % from.len() as u64) as usize]
    }
}

/// A JSON text of `size` bytes (at least about 150) that compresses as application JSON does:
/// a batch of order records (hex ids, user names, symbols, prices, quantities, statuses and
/// words from a small vocabulary, all drawn from a sequence seeded with `seed`), closed by a
/// comment of words that brings it to exactly `size` bytes.
pub fn json_records(size: usize, seed: u64) -> Vec<u8> {
    const USERS: [&str; 12] = [
        "olivia.martin",
        "liam.chen",
        "emma.garcia",
        "noah.schmidt",
        "ava.rossi",
        "lucas.dubois",
        "mia.novak",
        "ethan.kim",
        "sofia.silva",
        "leo.jansen",
        "zoe.murphy",
        "omar.haddad",
    ];
    const SYMBOLS: [&str; 8] = [
        "EURUSD", "GBPUSD", "USDJPY", "AAPL", "MSFT", "NVDA", "BTC-USD", "ETH-USD",
    ];
    const STATUSES: [&str; 5] = ["new", "partially_filled", "filled", "cancelled", "rejected"];
    const WORDS: [&str; 32] = [
        "order",
        "filled",
        "partial",
        "market",
        "limit",
        "cancel",
        "price",
        "update",
        "client",
        "session",
        "delayed",
        "network",
        "retry",
        "settled",
        "pending",
        "review",
        "account",
        "balance",
        "transfer",
        "invoice",
        "shipment",
        "warehouse",
        "priority",
        "express",
        "standard",
        "customer",
        "support",
        "ticket",
        "resolved",
        "escalated",
        "refund",
        "payment",
    ];
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut s = format!(
        r#"{{"type":"batch","seq":{},"ts":"2026-12-05T19:{:02}:{:02}.{:03}Z","source":"orders-eu-west-{}","items":["#,
        1_000_000 + rng.next() % 9_000_000,
        rng.next() % 60,
        rng.next() % 60,
        rng.next() % 1000,
        rng.next() % 4 + 1
    );
    let mut first = true;
    loop {
        let item = format!(
            r#"{{"id":"ord-{:012x}","user":"{}","side":"{}","symbol":"{}","price":{}.{:04},"qty":{},"status":"{}","note":"{} {} {}"}}"#,
            rng.next() & 0xffff_ffff_ffff,
            rng.pick(&USERS),
            rng.pick(&["buy", "sell"]),
            rng.pick(&SYMBOLS),
            rng.next() % 500,
            rng.next() % 10_000,
            (rng.next() % 200 + 1) * 50,
            rng.pick(&STATUSES),
            rng.pick(&WORDS),
            rng.pick(&WORDS),
            rng.pick(&WORDS),
        );
        // Room for the comment that closes the batch.
        if s.len() + 1 + item.len() + 40 > size {
            break;
        }
        if !first {
            s.push(',');
        }
        s.push_str(&item);
        first = false;
    }
    s.push_str(r#"],"comment":""#);
    while s.len() + 2 < size {
        s.push_str(rng.pick(&WORDS));
        s.push(' ');
    }
    if s.len() + 2 > size {
        let keep = size
            .saturating_sub(2)
            .max(s.rfind('"').map_or(0, |q| q + 1));
        s.truncate(keep);
    }
    s.push_str("\"}");
    s.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_json_of_the_size() {
        for size in [256, 1024, 4096] {
            for seed in 0..VARIANTS as u64 {
                let m = json_records(size, seed);
                assert_eq!(m.len(), size);
                let text = std::str::from_utf8(&m).unwrap();
                assert!(
                    text.starts_with(r#"{"type":"batch""#) && text.ends_with("\"}"),
                    "{text}"
                );
                // Balanced, as a cheap stand-in for a parser: no quote inside the strings.
                assert_eq!(text.matches('{').count(), text.matches('}').count());
            }
        }
        assert_ne!(json_records(1024, 0), json_records(1024, 1));
    }
}
