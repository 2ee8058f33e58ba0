//! A real `redis-server` (Debian's), started by a test on a free loopback port, without
//! persistence; stopped (killed by its PID) when dropped.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server`.
pub struct Redis {
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: super::TempDir,
}

fn binary() -> &'static str {
    for path in ["/usr/bin/redis-server", "/usr/local/bin/redis-server"] {
        if std::path::Path::new(path).exists() {
            return path;
        }
    }
    panic!("missing: redis-server (apt-get install redis-server); scripts/test installs it")
}

impl Redis {
    /// Starts one on a free port and waits until it answers PING.
    pub async fn start() -> Redis {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut redis = Redis {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: None,
            dir: super::TempDir::new("redis"),
        };
        redis.run().await;
        redis
    }

    async fn run(&mut self) {
        let child = Command::new(binary())
            .args(["--port", &self.addr.port().to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(&self.dir.0)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + super::EVENT_TIMEOUT;
        while Instant::now() < deadline {
            if self.ping().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server on {} did not answer PING", self.addr);
    }

    /// `redis://` URL of database 0.
    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Whether it answers PING now.
    pub async fn ping(&self) -> bool {
        self.command(&["PING"]).await.is_some_and(|r| r == "+PONG")
    }

    /// Sends one command and returns the first line of its reply.
    pub async fn command(&self, args: &[&str]) -> Option<String> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.addr).await.ok()?;
        let mut request = format!("*{}\r\n", args.len());
        for a in args {
            request.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut reader = tokio::io::BufReader::new(stream);
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(2), reader.read_line(&mut line))
            .await
            .ok()?
            .ok()?;
        let line = line.trim_end().to_owned();
        if let Some(len) = line.strip_prefix('$') {
            if len == "-1" {
                return Some("(nil)".into());
            }
            let mut value = String::new();
            reader.read_line(&mut value).await.ok()?;
            return Some(value.trim_end().to_owned());
        }
        Some(line)
    }

    /// Kills it (SIGKILL, by PID) and waits for its exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (empty: no persistence).
    pub async fn restart(&mut self) {
        self.stop();
        self.run().await;
    }

    /// Pauses it (SIGSTOP): connections stay open and nothing answers.
    pub fn pause(&self, paused: bool) {
        if let Some(child) = &self.child {
            let signal = if paused { "-STOP" } else { "-CONT" };
            let status = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .expect("kill runs");
            assert!(status.success());
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.stop();
    }
}
