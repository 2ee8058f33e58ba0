//! `server.watch = true`: a change to the configuration file, to a policy script it names, or
//! to a TLS listener's certificate or key file triggers a reload, debounced by [`DEBOUNCE`] (an editor's save is often several events:
//! truncate, write, rename). The folders holding those files are watched, not the files, so a
//! file replaced by a rename (as most editors save) is still seen. An event on another entry of
//! those folders counts only if a watched file now leads somewhere else through its symlinks:
//! Kubernetes updates a mounted ConfigMap or Secret by swapping a `..data` symlink, and
//! `config.toml` itself, a link through `..data`, is never written.

use std::collections::{HashMap, HashSet};
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

/// Starts watching the files of the current snapshot (set up before this returns, so that a
/// change right after start-up is seen), then reloads on each change until `stop`, or until a
/// reload turns `server.watch` off. The loop runs as a task on the current runtime.
pub(crate) fn start(reloader: Arc<Reloader>, stop: CancellationToken) {
    let (tx, rx) = mpsc::channel::<PathBuf>(EVENT_QUEUE);
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
    let mut watching = Watching {
        dirs: HashSet::new(),
        files: HashSet::new(),
        targets: HashMap::new(),
    };
    watching.follow(&mut watcher, &reloader.shared.snapshot().config);
    tokio::spawn(run(reloader, stop, watcher, watching, rx));
}

/// The folders watched and the files whose changes count.
struct Watching {
    dirs: HashSet<PathBuf>,
    files: HashSet<PathBuf>,
    /// Where each file led, its symlinks followed, when the current snapshot was taken up
    /// (`None`: it did not resolve).
    targets: HashMap<PathBuf, Option<PathBuf>>,
}

impl Watching {
    /// Watches what `config` names (and stops watching what it no longer names).
    fn follow(&mut self, watcher: &mut notify::RecommendedWatcher, config: &crate::config::Config) {
        self.files = watched_files(config);
        self.targets = self.files.iter().map(|f| (f.clone(), target(f))).collect();
        let dirs: HashSet<PathBuf> = self.files.iter().filter_map(|f| folder(f)).collect();
        for gone in self.dirs.difference(&dirs) {
            let _ = watcher.unwatch(gone);
        }
        for dir in dirs.difference(&self.dirs) {
            if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), error = %e, "server.watch: cannot watch this folder");
            }
        }
        self.dirs = dirs;
    }

    /// Whether `path`, an entry of a watched folder, is a change that counts: a watched file
    /// itself, or another entry (such as a swapped symlink) after which a watched file leads
    /// somewhere else. Only file events call this, never the relay.
    fn changed(&self, path: &Path) -> bool {
        self.files.contains(&normal(path))
            || self.targets.iter().any(|(file, was)| target(file) != *was)
    }
}

/// Where `file` leads, its symlinks followed.
fn target(file: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(file).ok()
}

async fn run(
    reloader: Arc<Reloader>,
    stop: CancellationToken,
    mut watcher: notify::RecommendedWatcher,
    mut watching: Watching,
    mut rx: mpsc::Receiver<PathBuf>,
) {
    loop {
        // Wait for a change to one of the files, or for a reload by another trigger (which
        // may name other files).
        let changed = loop {
            let path = tokio::select! {
                path = rx.recv() => match path { Some(p) => p, None => return },
                _ = reloader.reloaded.notified() => break false,
                _ = stop.cancelled() => return,
            };
            if watching.changed(&path) {
                break true;
            }
        };
        if changed {
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
        let snapshot = reloader.shared.snapshot();
        if !snapshot.config.server.watch {
            tracing::info!("server.watch is off: no longer watching the configuration files");
            return;
        }
        watching.follow(&mut watcher, &snapshot.config);
    }
}

/// The configuration file, every policy script and JSON Schema it names, and the certificate
/// and key files of its TLS listeners.
fn watched_files(config: &crate::config::Config) -> HashSet<PathBuf> {
    let certificates = config
        .server
        .tls
        .iter()
        .flat_map(|t| &t.certificates)
        .flat_map(|pair| [pair.cert_file.as_path(), pair.key_file.as_path()]);
    std::iter::once(config.origin.as_path())
        .chain(config.scripts())
        .chain(config.schemas())
        .chain(certificates)
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
