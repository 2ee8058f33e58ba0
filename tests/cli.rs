//! The command line: `framegate check` validates a configuration and reports problems as
//! `file:line:column: message` with a hint, without starting the gateway.

mod support;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use support::*;

/// Kills the child by its PID if the test ends before it exits.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs the framegate binary with `args` in `dir` and waits (bounded) for it to exit.
async fn framegate(args: &[&std::ffi::OsStr], dir: &Path) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_framegate"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("framegate starts");
    let mut running = Running(child);
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            pipe.read_to_string(&mut text).unwrap();
            text
        })
    };
    let stdout = drain(Box::new(running.0.stdout.take().unwrap()));
    let stderr = drain(Box::new(running.0.stderr.take().unwrap()));
    let status = within("framegate to exit", async {
        loop {
            if let Some(status) = running.0.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

async fn check(config: &Path) -> Output {
    framegate(
        &["check".as_ref(), "--config".as_ref(), config.as_os_str()],
        Path::new(env!("CARGO_MANIFEST_DIR")),
    )
    .await
}

/// `line:column` (1-based) of the first occurrence of `needle` in `source`.
fn position(source: &str, needle: &str) -> String {
    let offset = source
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in the test file"));
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("{line}:{column}")
}

fn assert_rejected(out: &Output, wanted: &[String]) {
    assert!(
        !out.status.success(),
        "check accepted a broken config: {}",
        out.stdout
    );
    assert!(!out.stdout.contains("OK"), "stdout says OK: {}", out.stdout);
    for want in wanted {
        assert!(
            out.stderr.contains(want.as_str()),
            "stderr lacks {want:?}:\n{}",
            out.stderr
        );
    }
}

#[tokio::test]
async fn check_accepts_a_good_config() {
    let dir = TempDir::new("good");
    let path = dir.write(
        "good.toml",
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshutdown_grace = \"3s\"\n\n\
         [[route]]\npath = \"/chat/{room}\"\nupstream = \"ws://127.0.0.1:9/rooms/{room}\"\n\
         expire = \"1h\"\nidle_timeout = \"10m\"\n",
    );
    let out = check(&path).await;
    assert!(
        out.status.success(),
        "check failed ({}):\n{}",
        out.status,
        out.stderr
    );
    assert_eq!(out.stdout.trim_end(), format!("{}: OK", path.display()));
}

#[tokio::test]
async fn check_locates_an_unknown_key() {
    let dir = TempDir::new("unknown-key");
    let src = "[[route]]\npath = \"/a\"\nupstream = \"ws://h/\"\nexpires = \"1h\"\n";
    let path = dir.write("bad.toml", src);
    let out = check(&path).await;
    let at = position(src, "expires");
    assert_eq!(at, "4:1");
    assert_rejected(
        &out,
        &[format!("{}:{at}: unknown field `expires`", path.display())],
    );
}

#[tokio::test]
async fn check_locates_an_undefined_upstream_placeholder_with_a_hint() {
    let dir = TempDir::new("placeholder");
    let src = "[[route]]\npath = \"/chat/{room}\"\nupstream = \"ws://h/{user}\"\n";
    let path = dir.write("bad.toml", src);
    let out = check(&path).await;
    let at = position(src, "\"ws://h/{user}\"");
    assert_eq!(at, "3:12");
    assert_rejected(
        &out,
        &[
            format!(
                "{}:{at}: upstream uses placeholder {{user}}",
                path.display()
            ),
            "hint: the path /chat/{room} defines {room}".to_owned(),
        ],
    );
}

#[tokio::test]
async fn check_reports_a_missing_policy_script_relative_to_the_config() {
    let dir = TempDir::new("policy");
    let src = "[[route]]\npath = \"/a\"\nupstream = \"ws://h/\"\n[route.policies]\non_upgrade = \"nope.lua\"\n";
    let path = dir.write("bad.toml", src);
    // Run from elsewhere: the script is looked for next to the config file.
    let out = check(&path).await;
    let at = position(src, "\"nope.lua\"");
    assert_rejected(
        &out,
        &[
            format!(
                "{}:{at}: policy script \"nope.lua\" not found",
                path.display()
            ),
            dir.0.join("nope.lua").display().to_string(),
        ],
    );
}

#[tokio::test]
async fn check_locates_invalid_toml() {
    let dir = TempDir::new("syntax");
    let src = "[server]\nlisten = [\"127.0.0.1:0\"]\nshutdown_grace = 10s\n";
    let path = dir.write("bad.toml", src);
    let out = check(&path).await;
    let at = position(src, "10s");
    assert_eq!(at, "3:18");
    assert_rejected(&out, &[format!("{}:{at}: ", path.display())]);
}

#[tokio::test]
async fn unreadable_config_is_reported() {
    let missing = Path::new("/nonexistent.toml");
    assert!(!missing.exists());
    let out = framegate(
        &["--config".as_ref(), missing.as_os_str(), "check".as_ref()],
        Path::new(env!("CARGO_MANIFEST_DIR")),
    )
    .await;
    assert_rejected(
        &out,
        &[
            "/nonexistent.toml".to_owned(),
            "cannot read configuration".to_owned(),
        ],
    );
}

#[tokio::test]
async fn repository_config_passes_check() {
    let out = framegate(
        &[
            "check".as_ref(),
            "--config".as_ref(),
            "config.toml".as_ref(),
        ],
        Path::new(env!("CARGO_MANIFEST_DIR")),
    )
    .await;
    assert!(
        out.status.success(),
        "config.toml fails check ({}):\n{}",
        out.status,
        out.stderr
    );
    assert_eq!(out.stdout.trim_end(), "config.toml: OK");
}

#[tokio::test]
async fn check_refuses_a_reachable_admin_listener_without_a_token() {
    let dir = TempDir::new("admin-no-token");
    let src =
        "[admin]\nlisten = \"0.0.0.0:9901\"\n\n[[route]]\npath = \"/a\"\nupstream = \"ws://h/\"\n";
    let path = dir.write("bad.toml", src);
    let out = check(&path).await;
    let at = position(src, "\"0.0.0.0");
    assert_rejected(
        &out,
        &[format!(
            "{}:{at}: admin.listen 0.0.0.0:9901 is reachable from other hosts, so admin.token_file is required",
            path.display()
        )],
    );
    // With a token file it passes; a loopback address needs none.
    dir.write("admin.token", "0123456789abcdef0123\n");
    let good = dir.write(
        "good.toml",
        &src.replace("9901\"\n", "9901\"\ntoken_file = \"admin.token\"\n"),
    );
    assert!(check(&good).await.status.success());
    let local = dir.write("local.toml", &src.replace("0.0.0.0", "127.0.0.1"));
    assert!(check(&local).await.status.success());
}

#[tokio::test]
async fn check_validates_the_reload_keys() {
    let dir = TempDir::new("reload-keys");
    let src = "[server]\nwatch = true\ndrain_old = \"soon\"\n";
    let path = dir.write("bad.toml", src);
    let out = check(&path).await;
    let at = position(src, "\"soon\"");
    assert_rejected(
        &out,
        &[format!("{}:{at}: server.drain_old", path.display())],
    );
    let good = dir.write("good.toml", &src.replace("soon", "10m"));
    assert!(check(&good).await.status.success());
}
