//! The versioned runtime snapshot: everything derived from one configuration (its routes and
//! router, each route's TLS client settings, limits and compiled JSON Schemas, the text of its
//! policy scripts, the certificates of its `wss://` listeners), built
//! and validated before it is used, then never changed. A reload builds the next one and swaps
//! it in atomically (see [`crate::reload`]); each connection takes the current one once, when
//! its request head is routed, and keeps it to its end.
//!
//! The compiled policies are not here: Lua VMs belong to one thread, so each worker keeps its
//! own compiled [`Engine`](crate::policy::lua::Engine) per live snapshot number (see
//! `worker::Engines`).

mod tls;

use std::sync::Arc;

use crate::config::{Config, Route};
use crate::policy::lua::{LoadError, Sources};
use crate::route::{PathTemplate, Routable, Router};
use crate::upstream;

/// One configuration, ready to serve.
pub struct Snapshot {
    /// 1 for the configuration the gateway started with, then one more per successful reload.
    pub number: u64,
    /// The validated configuration it was built from.
    pub config: Config,
    /// The routes in file order.
    pub routes: Vec<Arc<RouteRuntime>>,
    router: Router<RouteRuntime>,
    /// Every policy script's text, as validated.
    pub(crate) sources: Sources,
    /// The rustls configuration of each `[[server.tls]]` listener, by its configured address:
    /// its certificates as read when this snapshot was built. A TLS connection takes the one
    /// current when it is accepted and keeps it.
    tls_listeners: Vec<(std::net::SocketAddr, Arc<rustls::ServerConfig>)>,
    /// Each `[[upstream]]` pool's TLS client settings (`[upstream.tls]`), by name.
    pool_tls: Vec<(String, Arc<rustls::ClientConfig>)>,
}

/// A route as connections use it: its configuration and what was built from it.
#[derive(Debug)]
pub struct RouteRuntime {
    /// The route's configuration.
    pub route: Arc<Route>,
    /// TLS client settings for `wss://` upstreams (`None` when the route cannot reach one);
    /// a pool's are the snapshot's [`Snapshot::pool_tls`].
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// `[route.jwt]`'s verifier, with its keys (or its entry in the JWKS cache).
    pub jwt: Option<Arc<crate::jwt::Verifier>>,
    /// The `[[upstream]]` pool the route names, as configured in this snapshot.
    pub pool: Option<Arc<crate::config::pool::Pool>>,
    /// `[route.validate]`'s schemas, compiled for this snapshot.
    pub validate: Option<Arc<crate::policy::validate::Schemas>>,
}

impl Routable for RouteRuntime {
    fn path(&self) -> &PathTemplate {
        &self.route.path
    }
    fn host(&self) -> Option<&str> {
        self.route.host.as_deref()
    }
    fn index(&self) -> usize {
        self.route.index
    }
    fn allow_encoded_slash(&self) -> bool {
        self.route.allow_encoded_slash
    }
}

/// Why a configuration could not become a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A route's TLS settings could not be loaded.
    #[error("route {route}: {message}")]
    Tls {
        /// The route's name.
        route: String,
        /// What went wrong.
        message: String,
    },
    /// A route's `[route.jwt]` keys could not be set up.
    #[error("route {route}: [route.jwt]: {message}")]
    Jwt {
        /// The route's name.
        route: String,
        /// What went wrong.
        message: String,
    },
    /// A policy script could not be read (or compiled, when the caller compiles it).
    #[error(transparent)]
    Policy(#[from] LoadError),
    /// A TLS listener's certificate or key could not be loaded: located at its key in the
    /// configuration file.
    #[error(transparent)]
    Certificate(crate::config::ConfigError),
    /// A `[route.validate]` schema does not compile: the error names its file.
    #[error(transparent)]
    Schema(crate::config::ConfigError),
}

impl Snapshot {
    /// Builds snapshot `number` from `config`: reads every policy script and loads every TLS
    /// setting, the listeners' certificates included. It does not compile the scripts: that is
    /// done on each worker (and once by the caller, to validate).
    pub fn build(config: Config, number: u64) -> Result<Snapshot, SnapshotError> {
        let sources = Sources::read(&config)?;
        let tls_listeners = config
            .server
            .tls
            .iter()
            .map(|l| tls::server_config(l, &config.origin).map(|c| (l.listen, c)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(SnapshotError::Certificate)?;
        let routes = config
            .routes
            .iter()
            .map(|route| {
                let pool = route
                    .pool
                    .as_deref()
                    .and_then(|name| config.pool(name))
                    .cloned();
                // A route's on_upgrade policy may pick a wss:// upstream too.
                let needs_tls = route.upstream.as_str().starts_with("wss://")
                    || route.policies.on_upgrade.is_some();
                let tls = needs_tls
                    .then(|| upstream::client_config(&route.upstream_tls))
                    .transpose()
                    .map_err(|message| SnapshotError::Tls {
                        route: route.name(),
                        message,
                    })?;
                let jwt = route
                    .jwt
                    .as_ref()
                    .map(|j| crate::jwt::Verifier::new(j.clone()).map(Arc::new))
                    .transpose()
                    .map_err(|message| SnapshotError::Jwt {
                        route: route.name(),
                        message,
                    })?;
                let validate = route
                    .validate
                    .as_deref()
                    .map(|v| crate::policy::validate::Schemas::compile(v).map(Arc::new))
                    .transpose()
                    .map_err(SnapshotError::Schema)?;
                Ok(Arc::new(RouteRuntime {
                    route: route.clone(),
                    tls,
                    jwt,
                    pool,
                    validate,
                }))
            })
            .collect::<Result<Vec<_>, SnapshotError>>()?;
        let pool_tls = config
            .upstreams
            .iter()
            .map(|pool| {
                upstream::pool_client_config(&pool.tls)
                    .map(|tls| (pool.name.clone(), tls))
                    .map_err(|message| SnapshotError::Tls {
                        route: format!("upstream {}", pool.name),
                        message,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Snapshot {
            pool_tls,
            number,
            router: Router::new(&routes),
            routes,
            config,
            sources,
            tls_listeners,
        })
    }

    /// The rustls configuration of the TLS listener configured as `listen`.
    pub(crate) fn tls_config(
        &self,
        listen: std::net::SocketAddr,
    ) -> Option<&Arc<rustls::ServerConfig>> {
        self.tls_listeners
            .iter()
            .find(|(a, _)| *a == listen)
            .map(|(_, c)| c)
    }

    /// The TLS client settings of the pool `name`.
    pub(crate) fn pool_tls(&self, name: &str) -> Option<&Arc<rustls::ClientConfig>> {
        self.pool_tls
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c)
    }

    /// The router over this snapshot's routes.
    pub fn router(&self) -> &Router<RouteRuntime> {
        &self.router
    }

    /// What changed from `old` to this snapshot, by route name.
    pub fn changes_since(&self, old: &Snapshot) -> Changes {
        let name = |r: &Arc<RouteRuntime>| r.route.name();
        let mut changes = Changes::default();
        for new in &self.routes {
            let key = name(new);
            match old.routes.iter().find(|o| name(o) == key) {
                None => changes.added.push(key),
                Some(o) => {
                    let same_scripts = new.route.policies.is_empty()
                        || scripts_same(&old.sources, &self.sources, &new.route);
                    if !same_route(&o.route, &new.route) || !same_scripts {
                        changes.changed.push(key);
                    }
                }
            }
        }
        for o in &old.routes {
            let key = name(o);
            if !self.routes.iter().any(|n| name(n) == key) {
                changes.removed.push(key);
            }
        }
        changes
    }
}

/// The routes a reload added, removed or changed, by name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Routes only in the new snapshot.
    pub added: Vec<String>,
    /// Routes only in the old one.
    pub removed: Vec<String>,
    /// Routes in both, with a different setting or script text.
    pub changed: Vec<String>,
}

/// Whether two routes' settings are the same (their position aside).
fn same_route(a: &Route, b: &Route) -> bool {
    // `Route` is plain data: its debug form covers every setting.
    let mut a = a.clone();
    a.index = b.index;
    format!("{a:?}") == format!("{b:?}")
}

fn scripts_same(old: &Sources, new: &Sources, route: &Route) -> bool {
    let p = &route.policies;
    [
        &p.on_upgrade,
        &p.on_client_frame,
        &p.on_server_frame,
        &p.on_close,
    ]
    .into_iter()
    .flatten()
    .all(|path| old.text(path) == new.text(path))
}

/// Start-up (and reload) warnings about settings that are allowed but risky.
pub(crate) fn warn_about(config: &Config) {
    let watchdog = config.server.watchdog_timeout;
    for route in config
        .routes
        .iter()
        .filter(|r| r.policy_cpu_limit * 2 >= watchdog)
    {
        tracing::warn!(
            route = %route.name(),
            policy_cpu_limit = ?route.policy_cpu_limit,
            watchdog_timeout = ?watchdog,
            "policy_cpu_limit is at least half of server.watchdog_timeout: a policy call that uses its limit will be reported as a stalled worker"
        );
    }
    for route in config
        .routes
        .iter()
        .filter(|r| r.upstream_tls.insecure_skip_verify)
    {
        tracing::warn!(route = %route.name(), "upstream_tls.insecure_skip_verify is on: upstream certificates are not checked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(toml: &str, number: u64) -> Snapshot {
        let config = Config::from_toml(toml, std::path::Path::new("<test>")).unwrap();
        Snapshot::build(config, number).unwrap()
    }

    #[test]
    fn changes_name_added_removed_and_changed_routes() {
        let old = snapshot(
            "[[route]]\npath = \"/a\"\nupstream = \"ws://h/\"\n\
             [[route]]\npath = \"/b\"\nupstream = \"ws://h/\"\n\
             [[route]]\npath = \"/c\"\nupstream = \"ws://h/\"\n",
            1,
        );
        // /a moves (same settings), /b changes, /c goes, /d comes.
        let new = snapshot(
            "[[route]]\npath = \"/d\"\nupstream = \"ws://h/\"\n\
             [[route]]\npath = \"/a\"\nupstream = \"ws://h/\"\n\
             [[route]]\npath = \"/b\"\nupstream = \"ws://other/\"\n",
            2,
        );
        let changes = new.changes_since(&old);
        assert_eq!(changes.added, ["/d"]);
        assert_eq!(changes.removed, ["/c"]);
        assert_eq!(changes.changed, ["/b"]);
        // The router yields the runtime entry of this snapshot.
        let found = new.router().find(None, "/b").unwrap();
        assert_eq!(found.route.route.upstream.as_str(), "ws://other/");
        assert!(found.route.tls.is_none());
    }

    #[test]
    fn a_changed_schema_changes_its_route() {
        let dir = std::env::temp_dir().join(format!("framegate-snapshot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let schema = dir.join("s.json");
        let toml = format!(
            "[[route]]\npath = \"/v\"\nupstream = \"ws://h/\"\n[route.validate]\nclient = {:?}\n",
            schema.display().to_string()
        );
        std::fs::write(&schema, r#"{"type": "object"}"#).unwrap();
        let old = snapshot(&toml, 1);
        let same = snapshot(&toml, 2);
        std::fs::write(&schema, r#"{"type": "array"}"#).unwrap();
        let new = snapshot(&toml, 3);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            old.routes[0].validate.is_some(),
            "compiled with the snapshot"
        );
        assert!(same.changes_since(&old).changed.is_empty());
        assert_eq!(new.changes_since(&old).changed, ["/v"]);
    }
}
