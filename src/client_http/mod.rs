//! The client's side of HTTP/1.1, written on the socket: reading a request head under the
//! header read timeout ([`read_request`]) and encoding answers ([`Answer`], the 101).
//!
//! A gateway that only upgrades needs little of HTTP: one head to parse, one answer to write,
//! and no request bodies (a request that has one is answered and its connection closed). So no
//! HTTP server sits in front of the relay: it would cost a connection task's worth of buffers,
//! channels and allocations per upgrade for an exchange that ends after one response.

mod answer;
mod head;

pub(crate) use answer::{header_line, switching_protocols, Answer};
#[cfg(test)]
pub(crate) use head::parse as parse_head;
pub(crate) use head::{
    has_empty_line, lists_token, of_parts as head_of_parts, parse_length, BadRequest, RequestHead,
    MAX_HEAD,
};

use std::future::Future;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// What the socket is asked for at a time. Like NGINX's `client_header_buffer_size` (1k),
/// enough for most upgrade requests; a longer head grows the buffer. Just under 1 KiB: glibc
/// serves smaller blocks from its per-size lists, while a block of 1 KiB or more first
/// consolidates every freed small block of the thread (about 1k instructions per handshake).
const READ_SIZE: usize = 1000;

/// Why no request head could be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The head is not one to serve; it gets an answer with the error's status.
    #[error(transparent)]
    Bad(#[from] BadRequest),
    /// The head did not arrive within `server.header_read_timeout`.
    #[error("no complete request head within {0:?}")]
    Timeout(Duration),
    /// The client closed its side in the middle of a head.
    #[error("connection closed after {0} bytes of a request head")]
    Closed(usize),
    /// Shutdown began, or the connection was shed, in the middle of a head.
    #[error("cut after {0} bytes of a request head")]
    Cut(usize),
    /// Reading failed (connection reset, …).
    #[error("reading the request failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the next request head from `io`, starting with the bytes already in `buf`. Returns
/// the head and the bytes read past it; `Ok(None)` when the client closed the connection
/// between requests, or when it sent nothing for `idle` (a kept-alive connection), or when
/// `cut` fires before a request started.
///
/// The whole head must arrive within `timeout`: from now, or with `idle`, from its first byte
/// (so a kept-alive connection waits `idle` for the next request, then `timeout` for its
/// head, as NGINX's `keepalive_timeout` and `client_header_timeout` do). `cut` (shutdown, or
/// the connection being shed) ends the read at once, even in the middle of a head.
pub(crate) async fn read_request<IO>(
    io: &mut IO,
    buf: &mut BytesMut,
    idle: Option<Duration>,
    timeout: Duration,
    cut: impl Future<Output = ()>,
) -> Result<Option<(RequestHead, Bytes)>, ReadError>
where
    IO: AsyncRead + Unpin,
{
    let mut idle = idle.filter(|_| buf.is_empty());
    // Created now, registered with the timer only if a read has to wait.
    let deadline = tokio::time::sleep(idle.unwrap_or(timeout));
    tokio::pin!(deadline);
    tokio::pin!(cut);
    // Parsed once an empty line has come (parsing again on every read would be quadratic in a
    // head that trickles in), and checked on the first bytes so that garbage fails at once.
    let mut checked: usize = 0;
    loop {
        if has_empty_line(&buf[checked.saturating_sub(2)..]) {
            if let Some(parsed) = head::parse(buf)? {
                return Ok(Some(parsed));
            }
        } else if checked == 0 && !buf.is_empty() {
            head::check_start(buf)?;
        }
        if buf.len() > MAX_HEAD {
            return Err(BadRequest::TooLarge.into());
        }
        if idle.is_some() && !buf.is_empty() {
            // The next request has started: its head gets the whole timeout.
            idle = None;
            deadline
                .as_mut()
                .reset(tokio::time::Instant::now() + timeout);
        }
        checked = buf.len();
        if buf.capacity() - buf.len() < READ_SIZE / 4 {
            buf.reserve(READ_SIZE);
        }
        tokio::select! {
            biased;
            read = io.read_buf(buf) => match read? {
                0 if buf.is_empty() => return Ok(None),
                0 => return Err(ReadError::Closed(buf.len())),
                _ => {}
            },
            () = &mut deadline => return match idle {
                Some(_) => Ok(None),
                None => Err(ReadError::Timeout(timeout)),
            },
            () = &mut cut => return match buf.len() {
                0 => Ok(None),
                n => Err(ReadError::Cut(n)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio_util::sync::CancellationToken;

    const FIVE: Duration = Duration::from_secs(5);

    fn shutdown() -> CancellationToken {
        CancellationToken::new()
    }

    #[tokio::test]
    async fn a_head_cut_across_reads_is_read_whole() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for part in ["GET /a HT", "TP/1.1\r\nHost: x\r", "\n\r", "\nrest"] {
                client.write_all(part.as_bytes()).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let mut buf = BytesMut::new();
        let (head, rest) = read_request(
            &mut server,
            &mut buf,
            None,
            FIVE,
            shutdown().cancelled_owned(),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(head.path(), "/a");
        // What came after the head in the same read is returned; later bytes stay unread.
        assert!(b"rest".starts_with(&rest), "{rest:?}");
        drop(writer.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_head_times_out_and_an_idle_one_ends_at_shutdown() {
        let (mut client, mut server) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut buf = BytesMut::new();
        let read = read_request(
            &mut server,
            &mut buf,
            None,
            FIVE,
            shutdown().cancelled_owned(),
        )
        .await;
        assert!(matches!(read, Err(ReadError::Timeout(_))), "{read:?}");

        let (_client, mut server) = tokio::io::duplex(64);
        let token = shutdown();
        token.cancel();
        let mut buf = BytesMut::new();
        let read = read_request(&mut server, &mut buf, None, FIVE, token.cancelled_owned()).await;
        assert!(matches!(read, Ok(None)), "{read:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_alive_connection_waits_idle_then_the_whole_timeout_and_shutdown_cuts_a_head() {
        use tokio::io::AsyncWriteExt;
        // Nothing within `idle`: a quiet end.
        let (_client, mut server) = tokio::io::duplex(64);
        let mut buf = BytesMut::new();
        let idle = Some(Duration::from_secs(1));
        let read = read_request(
            &mut server,
            &mut buf,
            idle,
            FIVE,
            shutdown().cancelled_owned(),
        )
        .await;
        assert!(matches!(read, Ok(None)), "{read:?}");

        // A head that starts within `idle` gets the whole timeout from its first byte.
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(900)).await;
            client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(4)).await;
            client.write_all(b"Host: x\r\n\r\n").await.unwrap();
            client
        });
        let mut buf = BytesMut::new();
        let read = read_request(
            &mut server,
            &mut buf,
            idle,
            FIVE,
            shutdown().cancelled_owned(),
        )
        .await;
        assert!(matches!(read, Ok(Some(_))), "{read:?}");
        drop(writer.await.unwrap());

        // A cut in the middle of a head ends it at once.
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
        let token = shutdown();
        let cut = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            cut.cancel();
        });
        let mut buf = BytesMut::new();
        let read = read_request(&mut server, &mut buf, None, FIVE, token.cancelled_owned()).await;
        assert!(matches!(read, Err(ReadError::Cut(18))), "{read:?}");
    }

    #[tokio::test]
    async fn a_close_between_requests_is_not_an_error_but_one_inside_is() {
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        let mut buf = BytesMut::new();
        let read = read_request(
            &mut server,
            &mut buf,
            None,
            FIVE,
            shutdown().cancelled_owned(),
        )
        .await;
        assert!(matches!(read, Ok(None)), "{read:?}");

        let (mut client, mut server) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        drop(client);
        let mut buf = BytesMut::new();
        let read = read_request(
            &mut server,
            &mut buf,
            None,
            FIVE,
            shutdown().cancelled_owned(),
        )
        .await;
        assert!(matches!(read, Err(ReadError::Closed(16))), "{read:?}");
    }

    #[tokio::test]
    async fn garbage_fails_on_its_first_bytes_and_a_huge_head_is_refused() {
        let (mut client, mut server) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        client.write_all(b"\x16\x03\x01\x00").await.unwrap();
        let mut buf = BytesMut::new();
        let read = read_request(
            &mut server,
            &mut buf,
            None,
            FIVE,
            shutdown().cancelled_owned(),
        )
        .await;
        assert!(
            matches!(read, Err(ReadError::Bad(BadRequest::Malformed(_)))),
            "{read:?}"
        );

        let (mut client, mut server) = tokio::io::duplex(MAX_HEAD * 2);
        let mut huge = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        huge.resize(MAX_HEAD + 100, b'a');
        client.write_all(&huge).await.unwrap();
        let mut buf = BytesMut::new();
        let read = read_request(
            &mut server,
            &mut buf,
            None,
            FIVE,
            shutdown().cancelled_owned(),
        )
        .await;
        assert!(
            matches!(read, Err(ReadError::Bad(BadRequest::TooLarge))),
            "{read:?}"
        );
    }
}
