//! `server.watch = true`: a change to the configuration file or to a policy script it names
//! triggers a reload, debounced by [`DEBOUNCE`] (an editor's save is often several events:
//! truncate, write, rename). The folders holding those files are watched, not the files, so a
//! file replaced by a rename (as most editors save) is still seen; events on other files in
//! those folders are ignored.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Reloader;

/// Quiet time after the last change before the reload starts.
pub(crate) const DEBOUNCE: Duration = Duration::from_millis(200);

/// File events queued between the watcher thread and the reload task; when full, further
/// events are dropped (one queued event is enough to trigger a reload).
const EVENT_QUEUE: usize = 64;

/// Watches the files of the current snapshot while it has `server.watch` on, reloading on a
/// change, until `stop`. Runs as a task on the main runtime.
pub(crate) async fn run(reloader: Arc<Reloader>, stop: CancellationToken) {
    let (tx, mut rx) = mpsc::channel::<PathBuf>(EVENT_QUEUE);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if event.kind.is_access() {
                return;
            }
            for path in event.paths {
                let _ = tx.try_send(path);
            }
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "server.watch: cannot watch files; reload with SIGHUP instead");
            return;
        }
    };
    let mut watched_dirs: HashSet<PathBuf> = HashSet::new();
    loop {
        let snapshot = reloader.shared.snapshot();
        if !snapshot.config.server.watch {
            // Turned off by a reload: it takes a restart (or SIGHUP) to turn it on again.
            tracing::info!("server.watch is off: no longer watching the configuration files");
            return;
        }
        let files = watched_files(&snapshot.config);
        let dirs: HashSet<PathBuf> = files.iter().filter_map(|f| folder(f)).collect();
        for gone in watched_dirs.difference(&dirs) {
            let _ = watcher.unwatch(gone);
        }
        for dir in dirs.difference(&watched_dirs) {
            if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), error = %e, "server.watch: cannot watch this folder");
            }
        }
        watched_dirs = dirs;
        // Wait for a change to one of the files.
        loop {
            let path = tokio::select! {
                path = rx.recv() => match path { Some(p) => p, None => return },
                _ = stop.cancelled() => return,
            };
            if files.contains(&normal(&path)) {
                break;
            }
        }
        // Debounce: wait until the files have been quiet for DEBOUNCE.
        loop {
            tokio::select! {
                _ = tokio::time::sleep(DEBOUNCE) => break,
                more = rx.recv() => if more.is_none() { return },
                _ = stop.cancelled() => return,
            }
        }
        tracing::info!("server.watch: a configuration file changed; reloading");
        // A failure is logged by the reload; the old snapshot keeps serving, and the next
        // change tries again.
        let _ = reloader.reload().await;
    }
}

/// The configuration file and every policy script it names.
fn watched_files(config: &crate::config::Config) -> HashSet<PathBuf> {
    std::iter::once(config.origin.as_path())
        .chain(config.scripts())
        .map(normal)
        .collect()
}

/// The folder to watch for `file`.
fn folder(file: &Path) -> Option<PathBuf> {
    file.parent().map(|p| {
        if p.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            p.to_path_buf()
        }
    })
}

/// An absolute form to compare event paths (absolute) with configured ones (maybe relative).
fn normal(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    // Symlinked folders (such as /tmp on some systems) are reported resolved.
    match (absolute.parent(), absolute.file_name()) {
        (Some(dir), Some(name)) => dir.canonicalize().map(|d| d.join(name)).unwrap_or(absolute),
        _ => absolute,
    }
}
