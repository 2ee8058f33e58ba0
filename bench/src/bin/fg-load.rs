//! The benchmark load generator. Every mode is bounded in time and count and prints one line of
//! `key=value` results for run.py.
//!
//! - `throughput`: N connections, each keeping M messages in flight; echoed messages per second
//!   (binary, or with `--json` text holding a JSON chat message of the size).
//! - `latency`: an open loop at a fixed total rate; each message carries its *intended* send
//!   time, so a stalled proxy cannot hide queueing (no coordinated omission); HDR percentiles.
//! - `connections`: opens N idle connections, reports handshakes per second, prints READY and
//!   holds them until stdin closes or the hold time ends. With `--query-key k`, connection i
//!   asks for the URL with `k=i` added to its query (distinct keys for a `hash` pool); with
//!   `--bearer-file`, connection i sends the file's token i (distinct JWTs).
//! - `rate`: an open loop of new connections at a fixed rate, each a handshake, one echoed
//!   message and a close; how many failed (before or after the 101) and, per second, how many
//!   succeeded (the pool failover benchmark).
//! - `http`: N kept-alive HTTP/1.1 connections, each with one small GET in flight at a time,
//!   to the URL's host and `--path`; requests per second (the HTTP pass-through benchmark).
//!
//! With `--deflate` (`throughput` and `connections`, `ws://` only), each connection offers
//! permessage-deflate with no context takeover either way and compresses what it sends and
//! inflates what it gets where the server accepts (framing and codec: `framegate_bench::pmd`;
//! tungstenite has no extensions). Its messages are then realistic JSON text (records with ids,
//! names, prices and words; 16 different ones of `--size` bytes, in turn), and each echo is
//! checked against what was sent. `throughput` also prints whether compression was agreed and
//! the bytes on the wire per message each way (frame headers included), and `connections` sends
//! one message on each connection and waits for its echo before holding it (so the gateway has
//! compressed and inflated on every connection it holds). A server that declines the offer gets
//! the same client, uncompressed: the same-client baseline.
//!
//! A `wss://` URL is loaded over TLS (rustls, ALPN `http/1.1`): every connection makes a full
//! handshake (no session resumption), and neither the server's certificate nor its signature is
//! checked, so that the load generator spends as little as it can on its side of the handshake.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use framegate_bench::{deflate_load, parse_duration};
use futures_util::{FutureExt, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

#[derive(Parser)]
struct Args {
    /// ws:// or wss:// URL to load.
    #[arg(long)]
    url: String,
    /// Runtime threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Extra request header "name: value" (repeatable).
    #[arg(long)]
    header: Vec<String>,
    /// A file of bearer tokens, one a line: in `connections` mode, connection i sends
    /// `authorization: Bearer <line i>` (cycling), so that each handshake carries its own token.
    #[arg(long)]
    bearer_file: Option<std::path::PathBuf>,
    /// Offer permessage-deflate (no context takeover) and send realistic JSON text
    /// (`throughput` and `connections`, `ws://` only).
    #[arg(long)]
    deflate: bool,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    Throughput {
        #[arg(long, default_value_t = 4)]
        connections: usize,
        #[arg(long, default_value_t = 32)]
        inflight: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Send text messages holding a JSON chat message of `size` bytes instead of binary.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        warmup: Duration,
        #[arg(long, default_value = "3s", value_parser = parse_duration)]
        duration: Duration,
    },
    Latency {
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Messages per second, all connections together.
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        warmup: Duration,
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        duration: Duration,
    },
    /// Opens N connections whose lifetimes are spread evenly over `spread` (each URL gets
    /// `?ttl=<seconds>`, which the gateway's on_upgrade policy passes to req:expire_in), waits for
    /// every close and reports how late each came.
    Expiry {
        #[arg(long, default_value_t = 9000)]
        count: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Lifetimes run from `base` to `base + spread`.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        base: Duration,
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        spread: Duration,
    },
    Http {
        #[arg(long, default_value_t = 4)]
        connections: usize,
        #[arg(long, default_value = "/http")]
        path: String,
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        warmup: Duration,
        #[arg(long, default_value = "3s", value_parser = parse_duration)]
        duration: Duration,
    },
    Connections {
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        hold: Duration,
        /// Adds `NAME=i` to connection i's query string.
        #[arg(long, value_name = "NAME")]
        query_key: Option<String>,
    },
    /// Opens `count` connections at `rate` per second, each due at its own time whatever the
    /// earlier ones are doing (an open loop); each makes a handshake, sends one text message,
    /// waits for its echo and closes. Prints START when the first one is due.
    Rate {
        #[arg(long, default_value_t = 100)]
        rate: u64,
        #[arg(long, default_value_t = 500)]
        count: usize,
        /// Bound on one connection's handshake and echo together.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

type Ws = WebSocketStream<Stream>;

/// A connection to the proxy: plain, or TLS for `wss://`.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The TLS client configuration for `wss://` URLs: full handshakes, any certificate.
fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            config.resumption = rustls::client::Resumption::disabled();
            Arc::new(config)
        })
        .clone()
}

/// Trusts any certificate and signature: the proxies under test use a throwaway certificate, and
/// the load generator's own checks would only slow it down (the proxy's side of the handshake,
/// what is measured, is the same).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn open(url: &str, headers: &[String]) -> anyhow::Result<Ws> {
    let mut request = url.into_client_request()?;
    for h in headers {
        let (k, v) = h.split_once(':').context("--header is name: value")?;
        request
            .headers_mut()
            .append(http_name(k.trim())?, v.trim().parse()?);
    }
    let host = request
        .uri()
        .authority()
        .context("URL has no host")?
        .as_str()
        .to_owned();
    let secure = request.uri().scheme_str() == Some("wss");
    let tcp = TcpStream::connect(&host).await?;
    tcp.set_nodelay(true)?;
    let stream = if secure {
        let name = request.uri().host().context("URL has no host")?;
        let name =
            rustls::pki_types::ServerName::try_from(name.trim_matches(['[', ']']))?.to_owned();
        let connector = tokio_rustls::TlsConnector::from(tls_config());
        Stream::Tls(Box::new(connector.connect(name, tcp).await?))
    } else {
        Stream::Plain(tcp)
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .max_message_size(Some(64 << 20));
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
    Ok(ws)
}

fn http_name(name: &str) -> anyhow::Result<tokio_tungstenite::tungstenite::http::HeaderName> {
    Ok(name.parse()?)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    let result = runtime.block_on(run(args));
    // Skip orderly teardown of thousands of sockets: the numbers are printed.
    std::process::exit(match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("fg-load: {e:#}");
            1
        }
    });
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.deflate {
        let (url, headers) = (&args.url, &args.header);
        return match args.mode {
            Mode::Throughput {
                connections,
                inflight,
                size,
                warmup,
                duration,
                json: _,
            } => {
                let load = deflate_load::Load::new(url, headers, size)?;
                load.throughput(connections, inflight, warmup, duration)
                    .await
            }
            Mode::Connections {
                count,
                concurrency,
                hold,
                query_key: None,
            } if args.bearer_file.is_none() => {
                let load = deflate_load::Load::new(url, headers, 1024)?;
                load.connections(count, concurrency, hold).await
            }
            _ => bail!("--deflate: only the throughput and connections modes (without --query-key or --bearer-file)"),
        };
    }
    match args.mode {
        Mode::Http {
            connections,
            path,
            warmup,
            duration,
        } => http_load(&args.url, &path, connections, warmup, duration).await,
        Mode::Expiry {
            count,
            concurrency,
            base,
            spread,
        } => expiry(&args.url, &args.header, count, concurrency, base, spread).await,
        Mode::Throughput {
            connections,
            inflight,
            size,
            json,
            warmup,
            duration,
        } => {
            let payload = match json {
                true => Message::text(json_message(size)),
                false => Message::Binary(Bytes::from(vec![b'x'; size])),
            };
            throughput(
                &args.url,
                &args.header,
                connections,
                inflight,
                payload,
                warmup,
                duration,
            )
            .await
        }
        Mode::Latency {
            connections,
            rate,
            size,
            warmup,
            duration,
        } => {
            latency(
                &args.url,
                &args.header,
                connections,
                rate,
                size,
                warmup,
                duration,
            )
            .await
        }
        Mode::Connections {
            count,
            concurrency,
            hold,
            query_key,
        } => {
            let bearers: Vec<String> = match &args.bearer_file {
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("--bearer-file {}", path.display()))?
                    .lines()
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect(),
                None => Vec::new(),
            };
            idle(
                &args.url,
                &args.header,
                count,
                concurrency,
                hold,
                query_key.as_deref(),
                &bearers,
            )
            .await
        }
        Mode::Rate {
            rate,
            count,
            timeout,
        } => rate_load(&args.url, &args.header, rate, count, timeout).await,
    }
}

/// `{"type":"chat","text":"xx…"}` of `size` bytes (at least its 28 bytes of frame): a message
/// the chat schemas in schemas/ accept.
fn json_message(size: usize) -> String {
    let frame = r#"{"type":"chat","text":""}"#;
    let text = "x".repeat(size.saturating_sub(frame.len()).max(1));
    format!(r#"{{"type":"chat","text":"{text}"}}"#)
}

async fn throughput(
    url: &str,
    headers: &[String],
    connections: usize,
    inflight: usize,
    payload: Message,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<()> {
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut ws = open(url, headers).await?;
        let (received, stop, payload) = (received.clone(), stop.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let mut in_flight = 0;
            while !stop.load(Ordering::Relaxed) {
                while in_flight < inflight {
                    ws.feed(payload.clone()).await?;
                    in_flight += 1;
                }
                ws.flush().await?;
                let mut got = match ws.next().await {
                    Some(Ok(m)) if m.is_binary() || m.is_text() => 1,
                    Some(Ok(_)) => 0,
                    Some(Err(e)) => return Err(e.into()),
                    None => bail!("connection closed"),
                };
                while let Some(Some(Ok(m))) = ws.next().now_or_never() {
                    got += u64::from(m.is_binary() || m.is_text());
                }
                in_flight -= got as usize;
                received.fetch_add(got, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    tokio::time::sleep(warmup).await;
    let start_count = received.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    let count = received.load(Ordering::Relaxed) - start_count;
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in &tasks {
        if t.is_finished() {
            bail!("a connection failed during the run");
        }
    }
    println!("msgs_per_sec={:.0}", count as f64 / elapsed);
    Ok(())
}

async fn latency(
    url: &str,
    headers: &[String],
    connections: usize,
    rate: u64,
    size: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<()> {
    let total = warmup + duration;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut ticks = Vec::new();
    let mut tasks = Vec::new();
    let mut sockets = Vec::new();
    for _ in 0..connections {
        sockets.push(open(url, headers).await?);
    }
    let base = Instant::now();
    for ws in sockets {
        let (mut sink, mut stream) = ws.split();
        let (tick_tx, mut tick_rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
        ticks.push(tick_tx);
        let sender = tokio::spawn(async move {
            while let Some(intended) = tick_rx.recv().await {
                let mut payload = vec![0u8; size.max(8)];
                payload[..8].copy_from_slice(&(intended.as_nanos() as u64).to_le_bytes());
                sink.send(Message::Binary(Bytes::from(payload))).await?;
            }
            Ok::<_, anyhow::Error>(sink)
        });
        let receiver = tokio::spawn(async move {
            let mut histogram =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            let deadline = base + total + Duration::from_secs(2);
            while let Ok(Some(message)) =
                tokio::time::timeout_at(deadline.into(), stream.next()).await
            {
                let Ok(Message::Binary(b)) = message else {
                    continue;
                };
                let intended =
                    Duration::from_nanos(u64::from_le_bytes(b[..8].try_into().expect("8 bytes")));
                if intended < warmup {
                    continue;
                }
                // Measured from the intended send time: a proxy that pushes back is charged
                // for the wait (no coordinated omission).
                histogram
                    .saturating_record(base.elapsed().saturating_sub(intended).as_micros() as u64);
                if intended + interval * connections as u32 >= total {
                    break;
                }
            }
            histogram
        });
        tasks.push((sender, receiver));
    }
    // The pacer: a plain thread sleeps precisely (tens of microseconds, where tokio's timer
    // wheel has a 1 ms resolution) and tells the connections, in turn, when to send.
    let pacer = std::thread::spawn(move || {
        let mut i: u32 = 0;
        loop {
            let intended = interval * i;
            if intended >= total {
                break;
            }
            if let Some(wait) = intended.checked_sub(base.elapsed()) {
                std::thread::sleep(wait);
            }
            if ticks[i as usize % ticks.len()].send(intended).is_err() {
                break;
            }
            i += 1;
        }
    });
    let mut merged = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    for (sender, receiver) in tasks {
        merged.add(receiver.await?).expect("same bounds");
        sender.abort();
    }
    let _ = pacer.join();
    let expected = (rate as f64 * duration.as_secs_f64()) as u64;
    if merged.len() < expected * 9 / 10 {
        bail!(
            "only {} of about {expected} messages came back",
            merged.len()
        );
    }
    // The histogram itself too (`value:count` per recorded bucket), so that run.py can pool
    // the samples of every repetition before taking percentiles.
    let buckets: Vec<String> = merged
        .iter_recorded()
        .map(|v| format!("{}:{}", v.value_iterated_to(), v.count_at_value()))
        .collect();
    println!(
        "p50_us={} p99_us={} p999_us={} samples={} histogram={}",
        merged.value_at_quantile(0.5),
        merged.value_at_quantile(0.99),
        merged.value_at_quantile(0.999),
        merged.len(),
        buckets.join(",")
    );
    Ok(())
}

async fn expiry(
    url: &str,
    headers: &[String],
    count: usize,
    concurrency: usize,
    base: Duration,
    spread: Duration,
) -> anyhow::Result<()> {
    // Open every connection first (bounded concurrency), remembering when each was answered.
    let mut open_conns: Vec<(Ws, Instant, Duration)> = Vec::with_capacity(count);
    let mut pending = futures_util::stream::FuturesUnordered::new();
    let mut launched = 0;
    while open_conns.len() < count {
        while launched < count && pending.len() < concurrency {
            let ttl = base + spread.mul_f64(launched as f64 / count as f64);
            let url = format!("{url}?ttl={:.3}", ttl.as_secs_f64());
            pending.push(async move {
                let ws = open(&url, headers).await?;
                Ok::<_, anyhow::Error>((ws, Instant::now(), ttl))
            });
            launched += 1;
        }
        match pending.next().await {
            Some(Ok(c)) => open_conns.push(c),
            Some(Err(e)) => bail!("connection {} failed: {e:#}", open_conns.len() + 1),
            None => break,
        }
    }
    println!("opened={}", open_conns.len());
    println!("READY");
    let last = base + spread + Duration::from_secs(5);
    let mut waits = futures_util::stream::FuturesUnordered::new();
    for (mut ws, answered, ttl) in open_conns {
        waits.push(async move {
            let deadline = answered + ttl;
            let end = tokio::time::timeout_at((answered + last).into(), async {
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_close() {
                        return Some(Instant::now());
                    }
                }
                None
            })
            .await;
            match end {
                // Our clock started when the 101 arrived, a little after the gateway's: a close
                // marginally "early" is on time.
                Ok(Some(at)) => Ok(at.saturating_duration_since(deadline)),
                _ => Err(()),
            }
        });
    }
    let mut late = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let mut missing = 0;
    while let Some(result) = waits.next().await {
        match result {
            Ok(lateness) => late.saturating_record(lateness.as_micros().max(1) as u64),
            Err(()) => missing += 1,
        }
    }
    println!(
        "late_p50_ms={:.1} late_p99_ms={:.1} late_max_ms={:.1} closed={} missing={missing}",
        late.value_at_quantile(0.5) as f64 / 1000.0,
        late.value_at_quantile(0.99) as f64 / 1000.0,
        late.max() as f64 / 1000.0,
        late.len()
    );
    Ok(())
}

async fn idle(
    url: &str,
    headers: &[String],
    count: usize,
    concurrency: usize,
    hold: Duration,
    query_key: Option<&str>,
    bearers: &[String],
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut open_conns: Vec<Ws> = Vec::with_capacity(count);
    let mut pending = futures_util::stream::FuturesUnordered::new();
    let mut launched = 0;
    while open_conns.len() < count {
        while launched < count && pending.len() < concurrency {
            let url = match query_key {
                Some(key) => {
                    let sep = if url.contains('?') { '&' } else { '?' };
                    format!("{url}{sep}{key}={launched}")
                }
                None => url.to_owned(),
            };
            let mut headers = headers.to_vec();
            if !bearers.is_empty() {
                headers.push(format!(
                    "authorization: Bearer {}",
                    bearers[launched % bearers.len()]
                ));
            }
            pending.push(async move { open(&url, &headers).await });
            launched += 1;
        }
        match pending.next().await {
            Some(Ok(ws)) => open_conns.push(ws),
            Some(Err(e)) => bail!("connection {} failed: {e:#}", open_conns.len() + 1),
            None => break,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "handshakes_per_sec={:.0} open={}",
        count as f64 / elapsed,
        open_conns.len()
    );
    println!("READY");
    // Hold until stdin closes (the orchestrator is done measuring) or the hold time ends.
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(hold, async {
        while stdin.read(&mut buf).await.map(|n| n > 0).unwrap_or(false) {}
    })
    .await;
    drop(open_conns);
    Ok(())
}

/// How one connection of `rate` failed.
enum RateFailure {
    /// No 101: the gateway refused, answered an error status, or did not answer in time.
    Handshake(String),
    /// Upgraded, but the echo did not come back.
    AfterUpgrade(String),
}

/// `rate`: one connection's handshake and echo, within `deadline`, then a close (bounded, and
/// not counted: the connection has done its work).
async fn handshake_and_echo(
    url: &str,
    headers: &[String],
    deadline: tokio::time::Instant,
) -> Result<Duration, RateFailure> {
    let started = Instant::now();
    let mut ws = match tokio::time::timeout_at(deadline, open(url, headers)).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => return Err(RateFailure::Handshake(format!("{e:#}"))),
        Err(_) => return Err(RateFailure::Handshake("timed out".into())),
    };
    let upgraded = started.elapsed();
    let echo = async {
        ws.send(Message::text("fg-rate")).await?;
        loop {
            match ws.next().await {
                Some(Ok(m)) if m.is_text() => return Ok(()),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => bail!("connection closed before the echo"),
            }
        }
    };
    match tokio::time::timeout_at(deadline, echo).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(RateFailure::AfterUpgrade(format!("{e:#}"))),
        Err(_) => return Err(RateFailure::AfterUpgrade("echo timed out".into())),
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        ws.close(None).await?;
        while ws.next().await.is_some() {}
        anyhow::Ok(())
    })
    .await;
    Ok(upgraded)
}

/// `rate`: `count` connections started at `rate` per second; each does a handshake, one echo
/// and a close within `timeout`. Prints the failures (before and after the 101), the handshake
/// times, and per second (by when each connection was due) how many succeeded and failed.
async fn rate_load(
    url: &str,
    headers: &[String],
    rate: u64,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    if rate == 0 {
        bail!("--rate must be at least 1");
    }
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let seconds = count.div_ceil(rate as usize);
    let url: Arc<str> = url.into();
    let headers: Arc<[String]> = headers.into();
    let mut tasks = tokio::task::JoinSet::new();
    let start = tokio::time::Instant::now();
    println!("START");
    for i in 0..count {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        let (url, headers) = (url.clone(), headers.clone());
        tasks.spawn(async move {
            let second = i / rate as usize;
            (
                second,
                handshake_and_echo(&url, &headers, due + timeout).await,
            )
        });
    }
    let mut ok_per_sec = vec![0u64; seconds];
    let mut failed_per_sec = vec![0u64; seconds];
    let (mut failed_handshake, mut failed_after) = (0u64, 0u64);
    let mut errors: std::collections::BTreeMap<String, u64> = Default::default();
    let mut times = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    while let Some(joined) = tasks.join_next().await {
        let (second, outcome) = joined?;
        match outcome {
            Ok(upgraded) => {
                ok_per_sec[second] += 1;
                times.saturating_record(upgraded.as_micros().max(1) as u64);
            }
            Err(failure) => {
                failed_per_sec[second] += 1;
                let error = match failure {
                    RateFailure::Handshake(e) => {
                        failed_handshake += 1;
                        format!("before the 101: {e}")
                    }
                    RateFailure::AfterUpgrade(e) => {
                        failed_after += 1;
                        format!("after the 101: {e}")
                    }
                };
                if errors.len() < 16 || errors.contains_key(&error) {
                    *errors.entry(error).or_default() += 1;
                }
            }
        }
    }
    for (error, n) in &errors {
        eprintln!("fg-load: {n} x {error}");
    }
    let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    println!(
        "sent={count} ok={} failed_handshake={failed_handshake} failed_after_101={failed_after} \
         handshake_p50_ms={:.2} handshake_p99_ms={:.2} handshake_max_ms={:.2} \
         ok_per_sec={} failed_per_sec={}",
        times.len(),
        times.value_at_quantile(0.5) as f64 / 1000.0,
        times.value_at_quantile(0.99) as f64 / 1000.0,
        times.max() as f64 / 1000.0,
        list(&ok_per_sec),
        list(&failed_per_sec)
    );
    Ok(())
}

/// `http`: kept-alive GETs, one in flight per connection, counted after `warmup`.
async fn http_load(
    url: &str,
    path: &str,
    connections: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<()> {
    let host = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split('/')
        .next()
        .context("URL has no host")?
        .to_owned();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes();
    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut stream = TcpStream::connect(&host).await?;
        stream.set_nodelay(true)?;
        let host = host.clone();
        let (request, counting, stop, count) = (
            request.clone(),
            counting.clone(),
            stop.clone(),
            count.clone(),
        );
        tasks.push(tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut buf = bytes::BytesMut::with_capacity(4096);
            while !stop.load(Ordering::Relaxed) {
                stream.write_all(&request).await?;
                let (status, close) = read_http_response(&mut stream, &mut buf).await?;
                if status != 200 {
                    bail!("the proxy answered {status}");
                }
                // A proxy that ends kept-alive connections after so many requests (NGINX's
                // and framegate's keepalive_requests) says so: connect again, as clients do.
                if close {
                    stream = TcpStream::connect(&host).await?;
                    stream.set_nodelay(true)?;
                    buf.clear();
                }
                if counting.load(Ordering::Relaxed) {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(warmup).await;
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    counting.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    let n = count.load(Ordering::Relaxed);
    println!("requests={n} reqs_per_sec={:.0}", n as f64 / elapsed);
    Ok(())
}

/// Reads one response with a `Content-Length` body from `stream` (`buf` keeps what came after
/// it); returns its status and whether it said `Connection: close`.
async fn read_http_response(
    stream: &mut TcpStream,
    buf: &mut bytes::BytesMut,
) -> anyhow::Result<(u16, bool)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end])?.to_ascii_lowercase();
            let status: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .context("bad status line")?;
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(Ok(0), |v| v.trim().parse())?;
            if buf.len() >= end + 4 + length {
                let _ = buf.split_to(end + 4 + length);
                let close = head.lines().any(|l| {
                    l.strip_prefix("connection:")
                        .is_some_and(|v| v.contains("close"))
                });
                return Ok((status, close));
            }
        }
        if stream.read_buf(buf).await? == 0 {
            bail!("the proxy closed the connection");
        }
    }
}
