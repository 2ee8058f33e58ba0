//! Built-in sample upstreams for the README demo and for tests: an echo server and a broadcast
//! chat (one room per request path). They are plain tokio-tungstenite servers on loopback.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

/// Starts an echo server on `addr`: every text or binary message comes straight back.
/// Returns the bound address.
pub async fn spawn_echo(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(echo(stream));
        }
    });
    Ok(bound)
}

async fn echo(stream: TcpStream) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    while let Some(Ok(message)) = ws.next().await {
        if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
            return;
        }
    }
}

type Rooms = Arc<Mutex<HashMap<String, broadcast::Sender<Message>>>>;

/// Starts a broadcast chat on `addr`: each message is sent to every connection on the same
/// path, the sender included. Returns the bound address.
pub async fn spawn_chat(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let rooms: Rooms = Rooms::default();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(chat(stream, rooms.clone()));
        }
    });
    Ok(bound)
}

// The handshake callback's error type is tungstenite's, large by its design.
#[allow(clippy::result_large_err)]
async fn chat(stream: TcpStream, rooms: Rooms) {
    let mut path = String::new();
    let remember_path = |request: &Request, response: Response| {
        path = request.uri().path().to_owned();
        Ok(response)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, remember_path).await else {
        return;
    };
    let sender = rooms
        .lock()
        .expect("chat rooms lock is never poisoned")
        .entry(path)
        .or_insert_with(|| broadcast::channel(256).0)
        .clone();
    let mut inbox = sender.subscribe();
    let (mut sink, mut source) = ws.split();
    loop {
        tokio::select! {
            incoming = source.next() => match incoming {
                Some(Ok(m)) if m.is_text() || m.is_binary() => { let _ = sender.send(m); }
                Some(Ok(_)) => {}
                _ => return,
            },
            outgoing = inbox.recv() => match outgoing {
                Ok(m) => if sink.send(m).await.is_err() { return },
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}
