//! The benchmark upstream: a WebSocket echo server on tokio-tungstenite. Replies are batched:
//! it echoes everything already received, then flushes once. A connection whose first request
//! is not a WebSocket upgrade is served as plain HTTP/1.1 instead (the HTTP pass-through
//! benchmark): every request head gets `200 ok`, kept alive. With `--reuse-port`, several
//! processes share one address (SO_REUSEPORT: the kernel spreads the connections), so that a
//! single upstream address can have the capacity of a pool of processes.
//!
//! With `--deflate`, WebSocket connections are served by the harness's own framing instead
//! (`framegate_bench::pmd`; tungstenite has no extensions): a permessage-deflate offer is
//! accepted with no context takeover either way, and each compressed message is inflated and
//! compressed again for its echo, as a compressing server does (one compressor per window size
//! and one decompressor per thread, so idle connections hold none). Connections that offer
//! nothing are echoed uncompressed by the same code.

use clap::Parser;
use std::cell::RefCell;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use framegate_bench::pmd::{self, Deflater, Event, Inflater, Reader};

thread_local! {
    /// This thread's compressors, one per window size (9 to 15 bits), and its decompressor:
    /// no context takeover, so any connection may use them between two awaits.
    static DEFLATERS: RefCell<[Option<Deflater>; 7]> = const { RefCell::new([const { None }; 7]) };
    static INFLATER: RefCell<Option<Inflater>> = const { RefCell::new(None) };
}

/// The largest message echoed.
const MAX_MESSAGE: usize = 64 << 20;

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:19000")]
    listen: String,
    /// Runtime threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Share the address with other processes started with this flag (SO_REUSEPORT).
    #[arg(long)]
    reuse_port: bool,
    /// Accept permessage-deflate and compress the echoes.
    #[arg(long)]
    deflate: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = if args.reuse_port {
            let addr: std::net::SocketAddr = args.listen.parse()?;
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.set_reuseport(true)?;
            socket.bind(addr)?;
            socket.listen(1024)?
        } else {
            TcpListener::bind(&args.listen).await?
        };
        println!("listening {}", listener.local_addr()?);
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(serve(stream, args.deflate));
        }
    })
}

/// Where `needle` starts in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Tells a WebSocket upgrade from plain HTTP by the first request head, without reading it.
async fn serve(stream: TcpStream, deflate: bool) {
    let mut peek = vec![0u8; 4096];
    let websocket = loop {
        let Ok(n) = stream.peek(&mut peek).await else {
            return;
        };
        if n == 0 {
            return;
        }
        match find(&peek[..n], b"\r\n\r\n") {
            Some(end) => break find(&peek[..end].to_ascii_lowercase(), b"websocket").is_some(),
            // A head longer than the peek: tungstenite judges it.
            None if n == peek.len() => break true,
            // Heads arrive whole on loopback; a split one is waited for briefly.
            None => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    };
    if websocket && deflate {
        echo_deflate(stream).await
    } else if websocket {
        echo(stream).await
    } else {
        http(stream).await
    }
}

/// Plain HTTP/1.1, kept alive: every request head (GET, no body) gets a 2-byte answer;
/// pipelined heads are answered in one write.
async fn http(mut stream: TcpStream) {
    const ANSWER: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = Vec::with_capacity(4096);
    loop {
        while let Some(end) = find(&buf, b"\r\n\r\n") {
            let _ = buf.split_to(end + 4);
            out.extend_from_slice(ANSWER);
        }
        if !out.is_empty() && stream.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
        if buf.len() > 64 * 1024 {
            return;
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

async fn echo(stream: TcpStream) {
    // Small buffers: idle benchmark connections should not cost the machine much.
    let config = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .max_message_size(Some(64 << 20));
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    while let Some(Ok(message)) = ws.next().await {
        if !(message.is_text() || message.is_binary()) {
            continue;
        }
        if ws.feed(message).await.is_err() {
            return;
        }
        while let Some(Some(Ok(more))) = ws.next().now_or_never() {
            if (more.is_text() || more.is_binary()) && ws.feed(more).await.is_err() {
                return;
            }
        }
        if ws.flush().await.is_err() {
            return;
        }
    }
}

/// `--deflate`: one connection, framed by `pmd`; compressed messages are inflated and their
/// echoes compressed again. Replies are batched as in [`echo`].
async fn echo_deflate(mut stream: TcpStream) {
    let mut reader = Reader::new(16 * 1024, MAX_MESSAGE);
    let Ok(window) = pmd::accept(&mut stream, &mut reader.buf, true).await else {
        return;
    };
    let mut out = Vec::with_capacity(16 * 1024);
    loop {
        let mut closed = false;
        let drained =
            DEFLATERS.with(|deflaters| {
                INFLATER.with(|inflater| {
                    let mut deflaters = deflaters.borrow_mut();
                    let mut inflater = inflater.borrow_mut();
                    reader.drain(|event| {
                        match event {
                            Event::Message {
                                opcode,
                                compressed,
                                payload,
                            } => match window {
                                Some(bits) if compressed => {
                                    let data = inflater
                                        .get_or_insert_with(Inflater::default)
                                        .inflate(payload, true, MAX_MESSAGE)?;
                                    let deflater = deflaters[usize::from(bits - 9)]
                                        .get_or_insert_with(|| Deflater::new(bits));
                                    pmd::put_frame(
                                        &mut out,
                                        opcode,
                                        true,
                                        deflater.deflate(data),
                                        None,
                                    );
                                }
                                _ if compressed => {
                                    return Err(std::io::Error::other(
                                        "RSV1 without permessage-deflate",
                                    ))
                                }
                                _ => pmd::put_frame(&mut out, opcode, false, payload, None),
                            },
                            Event::Ping(payload) => {
                                pmd::put_frame(&mut out, pmd::PONG, false, payload, None)
                            }
                            Event::Close(payload) => {
                                pmd::put_frame(
                                    &mut out,
                                    pmd::CLOSE,
                                    false,
                                    &payload[..payload.len().min(2)],
                                    None,
                                );
                                closed = true;
                            }
                        }
                        Ok(())
                    })
                })
            });
        if drained.is_err() {
            return;
        }
        if !out.is_empty() && stream.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
        if closed {
            return;
        }
        match stream.read_buf(&mut reader.buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}
