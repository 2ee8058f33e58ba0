//! The JavaScript side of the tests: node, the packages pinned in `tests/js/package-lock.json`
//! (installed by `scripts/test` with `npm ci`), and the system chromium.
//!
//! A test that needs one of them and does not find it fails with what to install; it never
//! skips.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// `tests/js`, where the scripts and their `node_modules` live.
pub fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js")
}

/// Fails the test, saying what to run, unless node and the pinned packages are installed.
pub fn require_packages() {
    let ok = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "missing: node 20 or newer (apt-get install nodejs)");
    let modules = js_dir().join("node_modules");
    assert!(
        modules.join(".package-lock.json").exists(),
        "missing: the node packages of tests/js (run `npm ci --prefix tests/js`, \
         or scripts/test, which does)"
    );
}

/// The system chromium for puppeteer-core: `FRAMEGATE_CHROMIUM`, else `chromium` on the
/// PATH. Fails the test, saying what to install, when there is none.
pub fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("FRAMEGATE_CHROMIUM") {
        return PathBuf::from(path);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        for name in ["chromium", "chromium-browser"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!("missing: chromium (apt-get install chromium), or set FRAMEGATE_CHROMIUM");
}

/// Starts `node tests/js/<script> <args>` with piped stdout (the script's lines, e.g. the
/// port it listens on) and stderr inherited. The child is ended, by its PID, when the
/// returned guard drops.
pub fn spawn(script: &str, args: &[&str]) -> NodeProcess {
    require_packages();
    let mut child = Command::new("node")
        .arg(js_dir().join(script))
        .args(args)
        .current_dir(js_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("missing: node (apt-get install nodejs): {e}"));
    let stdout = child.stdout.take().map(std::io::BufReader::new);
    NodeProcess { child, stdout }
}

/// A node process started by [`spawn`], ended when dropped.
pub struct NodeProcess {
    pub child: Child,
    stdout: Option<std::io::BufReader<std::process::ChildStdout>>,
}

impl NodeProcess {
    /// The next line the script printed, on a blocking thread, within the tests' event
    /// timeout; `None` when the script ended first.
    pub async fn line(&mut self) -> Option<String> {
        use std::io::BufRead;
        let mut reader = self.stdout.take()?;
        let read = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            let n = reader.read_line(&mut line).unwrap_or(0);
            (reader, (n > 0).then(|| line.trim_end().to_string()))
        });
        let (reader, line) = super::within("a line from a node script", read)
            .await
            .expect("reading a node script's output");
        self.stdout = Some(reader);
        line
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
