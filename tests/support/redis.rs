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
    /// Extra arguments (and, for a Sentinel, the config file first).
    extra: Vec<String>,
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
        Redis::start_with(&[]).await
    }

    /// A replica of `primary`.
    pub async fn replica_of(primary: &Redis) -> Redis {
        let port = primary.addr.port().to_string();
        Redis::start_with(&["--replicaof", "127.0.0.1", &port]).await
    }

    /// A Sentinel monitoring `primary` as `service` (quorum 1, down after 500 ms).
    pub async fn sentinel(primary: &Redis, service: &str) -> Redis {
        let dir = super::TempDir::new("sentinel");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let conf = dir.write(
            "sentinel.conf",
            &format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\n\
                 sentinel monitor {service} 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds {service} 500\n\
                 sentinel failover-timeout {service} 2000\n",
                primary.addr.port()
            ),
        );
        let mut redis = Redis {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: None,
            dir,
            extra: vec![conf.display().to_string(), "--sentinel".into()],
        };
        redis.run().await;
        redis
    }

    /// One that speaks only TLS (no plain port) on a free port, with this certificate chain
    /// and key (PEM files); it needs no client certificate. Ready once the port accepts.
    pub async fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Redis {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        let tls_port = port.to_string();
        let mut redis = Redis {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: None,
            dir: super::TempDir::new("redis-tls"),
            extra: [
                "--tls-port",
                &tls_port,
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-auth-clients",
                "no",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        };
        redis.run().await;
        redis
    }

    /// Starts one on a free port with `extra` arguments.
    pub async fn start_with(extra: &[&str]) -> Redis {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut redis = Redis {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: None,
            dir: super::TempDir::new("redis"),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        redis.run().await;
        redis
    }

    async fn run(&mut self) {
        let mut command = Command::new(binary());
        let tls = self.extra.iter().any(|a| a == "--tls-port");
        if self.extra.iter().any(|a| a == "--sentinel") {
            command.args(&self.extra);
        } else if tls {
            command
                .args([
                    "--port",
                    "0",
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .args(["--protected-mode", "no", "--loglevel", "warning"])
                .arg("--dir")
                .arg(&self.dir.0)
                .args(&self.extra);
        } else {
            command
                .args(["--port", &self.addr.port().to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--protected-mode", "no", "--loglevel", "warning"])
                .arg("--dir")
                .arg(&self.dir.0)
                .args(&self.extra);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + super::EVENT_TIMEOUT;
        while Instant::now() < deadline {
            let ready = if tls {
                tokio::net::TcpStream::connect(self.addr).await.is_ok()
            } else {
                self.ping().await
            };
            if ready {
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

    /// Sends one command and returns its reply: a status, error or integer line as it is, a
    /// bulk string's value (`(nil)` for none), an array's elements joined by commas.
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
        if let Some(count) = line.strip_prefix('*') {
            // Nested arrays (a Sentinel's answers) are flattened.
            let mut items = Vec::new();
            let mut remaining = count.parse::<i64>().unwrap_or(0);
            while remaining > 0 {
                remaining -= 1;
                let mut head = String::new();
                reader.read_line(&mut head).await.ok()?;
                let head = head.trim_end();
                if let Some(n) = head.strip_prefix('*') {
                    remaining += n.parse::<i64>().unwrap_or(0);
                } else if head.starts_with('$') && head != "$-1" {
                    let mut value = String::new();
                    reader.read_line(&mut value).await.ok()?;
                    items.push(value.trim_end().to_owned());
                } else {
                    items.push(head.to_owned());
                }
            }
            return Some(items.join(","));
        }
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
