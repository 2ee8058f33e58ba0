//! Path resolvers: choose the route for a request's host and path.
//!
//! Precedence, documented in docs/configuration.md: routes whose `host` equals the request's host
//! are tried before routes without `host`; within each group an exact literal path beats a
//! template, a template beats a catch-all, and ties go to file order. Paths are matched in
//! their normal form, and placeholder values are checked before anything uses them (see
//! [`normalize`](normalize::normalize)).

mod normalize;
pub mod origin;
mod template;

pub use normalize::{check_param, normalize, PathError};
pub use template::{Params, PathTemplate, Specificity};

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

/// What the router needs to know of a route. Implemented by the configuration's route and by
/// the runtime entry of a snapshot, so that routing does not depend on either.
pub trait Routable {
    /// The path template requests must match.
    fn path(&self) -> &PathTemplate;
    /// The host the route is restricted to, if any.
    fn host(&self) -> Option<&str>;
    /// Position in the file: the tie-breaker among equally specific routes.
    fn index(&self) -> usize;
    /// Whether placeholder values may hold encoded slashes.
    fn allow_encoded_slash(&self) -> bool;
}

/// The chosen route and the placeholder values captured from the path.
#[derive(Debug)]
pub struct RouteMatch<'p, R> {
    /// The matched route.
    pub route: Arc<R>,
    /// Path placeholders, in template order, from the normalised path.
    pub params: Params,
    /// The normalised request path the route was matched on.
    pub path: Cow<'p, str>,
}

/// Why no route serves a request.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The path, or a placeholder value, is refused (400).
    #[error(transparent)]
    BadPath(#[from] PathError),
    /// No route matches the host and the (normalised) path (404).
    #[error("no route for {0}")]
    NoRoute(String),
}

/// A route and its placeholders, before the path is attached.
struct Found<R> {
    route: Arc<R>,
    params: Params,
}

/// Matches requests to routes; built once per configuration snapshot.
#[derive(Debug)]
pub struct Router<R> {
    /// Routes with a `host`, keyed by lower-case host.
    by_host: HashMap<String, Group<R>>,
    /// Routes without a `host`.
    any_host: Group<R>,
}

/// Routes sharing one host key, pre-sorted by precedence.
#[derive(Debug)]
struct Group<R> {
    /// Exact literal paths: one hash look-up. The first route in file order wins a duplicate.
    exact: HashMap<String, Arc<R>>,
    /// Templates and catch-alls whose first segment is literal, by that segment; each list is
    /// sorted by precedence (templates, then catch-alls, each in file order).
    by_first_segment: HashMap<String, Vec<Arc<R>>>,
    /// Templates and catch-alls that start with a placeholder, sorted the same way.
    open_first_segment: Vec<Arc<R>>,
}

impl<R> Default for Group<R> {
    fn default() -> Self {
        Group {
            exact: HashMap::new(),
            by_first_segment: HashMap::new(),
            open_first_segment: Vec::new(),
        }
    }
}

/// The precedence of a route among matching ones: lower wins.
fn rank<R: Routable>(route: &R) -> (Specificity, usize) {
    (route.path().specificity(), route.index())
}

impl<R: Routable> Group<R> {
    fn insert(&mut self, route: Arc<R>) {
        if route.path().specificity() == Specificity::Exact {
            let key = route
                .path()
                .exact_path()
                .unwrap_or_else(|| route.path().as_str().to_owned());
            self.exact.entry(key).or_insert(route);
            return;
        }
        let list = match route.path().first_literal() {
            Some(first) => self.by_first_segment.entry(first.to_owned()).or_default(),
            None => &mut self.open_first_segment,
        };
        list.push(route);
        list.sort_by_key(|r| rank(&**r));
    }

    fn find(&self, path: &str) -> Option<Found<R>> {
        if let Some(route) = self.exact.get(path) {
            return Some(Found {
                route: route.clone(),
                params: Params::new(),
            });
        }
        let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
        let first_match = |list: &[Arc<R>]| {
            list.iter().find_map(|route| {
                route.path().matches(path).map(|params| Found {
                    route: route.clone(),
                    params,
                })
            })
        };
        let keyed = self
            .by_first_segment
            .get(first)
            .and_then(|l| first_match(l));
        let open = first_match(&self.open_first_segment);
        match (keyed, open) {
            (Some(a), Some(b)) => Some(if rank(&*a.route) <= rank(&*b.route) {
                a
            } else {
                b
            }),
            (a, b) => a.or(b),
        }
    }
}

impl<R: Routable> Router<R> {
    /// Builds a router over `routes`, given in file order.
    pub fn new(routes: &[Arc<R>]) -> Self {
        let mut router = Router {
            by_host: HashMap::new(),
            any_host: Group::default(),
        };
        for route in routes {
            match route.host() {
                Some(host) => router
                    .by_host
                    .entry(name_key(host))
                    .or_default()
                    .insert(route.clone()),
                None => router.any_host.insert(route.clone()),
            }
        }
        router
    }

    /// Finds the route for `host` (a Host header value, port allowed) and `path` (the raw
    /// request path, no query): normalises the path, matches it, and checks the placeholder
    /// values against the route's `allow_encoded_slash`.
    pub fn find<'p>(
        &self,
        host: Option<&str>,
        path: &'p str,
    ) -> Result<RouteMatch<'p, R>, RouteError> {
        let path = normalize(path)?;
        let found = self
            .find_normal(host, &path)
            .ok_or_else(|| RouteError::NoRoute(path.clone().into_owned()))?;
        for (name, value) in &found.params {
            check_param(name, value, found.route.allow_encoded_slash())?;
        }
        Ok(RouteMatch {
            route: found.route,
            params: found.params,
            path,
        })
    }

    fn find_normal(&self, host: Option<&str>, path: &str) -> Option<Found<R>> {
        if !self.by_host.is_empty() {
            if let Some(group) = host.and_then(|h| self.by_host.get(&host_key(h))) {
                if let Some(found) = group.find(path) {
                    return Some(found);
                }
            }
        }
        self.any_host.find(path)
    }
}

/// Lower-cases a Host header value and strips its port (`[::1]:80` keeps its brackets) and a
/// trailing dot: `Example.com.:80` is `example.com`, the same name written fully qualified.
fn host_key(host: &str) -> String {
    let host = host.trim();
    let without_port = if host.starts_with('[') {
        host.find(']').map_or(host, |i| &host[..=i])
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name_key(without_port)
}

/// A host name without its port, in lower case and without a trailing dot.
pub(crate) fn name_key(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Route};

    fn router(toml: &str) -> Router<Route> {
        let config = Config::from_toml(toml, std::path::Path::new("<test>")).unwrap();
        Router::new(&config.routes)
    }

    fn upstream_of(r: &Router<Route>, host: Option<&str>, path: &str) -> Option<String> {
        r.find(host, path)
            .ok()
            .map(|m| m.route.upstream.as_str().to_owned())
    }

    #[test]
    fn precedence_exact_then_template_then_catch_all_then_file_order() {
        let r = router(
            r#"
            [[route]]
            path = "/{*rest}"
            upstream = "ws://h/catch"
            [[route]]
            path = "/chat/{room}"
            upstream = "ws://h/template1"
            [[route]]
            path = "/chat/{other}"
            upstream = "ws://h/template2"
            [[route]]
            path = "/chat/lobby"
            upstream = "ws://h/exact"
            "#,
        );
        assert_eq!(
            upstream_of(&r, None, "/chat/lobby").unwrap(),
            "ws://h/exact"
        );
        assert_eq!(
            upstream_of(&r, None, "/chat/x").unwrap(),
            "ws://h/template1"
        );
        assert_eq!(upstream_of(&r, None, "/other").unwrap(), "ws://h/catch");
    }

    #[test]
    fn host_specific_routes_win_and_fall_back() {
        let r = router(
            r#"
            [[route]]
            path = "/ws"
            upstream = "ws://h/any"
            [[route]]
            path = "/ws"
            host = "Chat.Example.com"
            upstream = "ws://h/chat"
            "#,
        );
        assert_eq!(
            upstream_of(&r, Some("chat.example.com:8080"), "/ws").unwrap(),
            "ws://h/chat"
        );
        assert_eq!(upstream_of(&r, Some("other"), "/ws").unwrap(), "ws://h/any");
        assert_eq!(upstream_of(&r, None, "/ws").unwrap(), "ws://h/any");
        assert!(upstream_of(&r, None, "/nope").is_none());
    }

    #[test]
    fn precedence_holds_across_first_segment_buckets() {
        let r = router(
            r#"
            [[route]]
            path = "/{any}/x"
            upstream = "ws://h/open-template"
            [[route]]
            path = "/a/{*rest}"
            upstream = "ws://h/keyed-catch-all"
            [[route]]
            path = "/{*all}"
            upstream = "ws://h/open-catch-all"
            [[route]]
            path = "/b/{id}"
            upstream = "ws://h/keyed-template"
            "#,
        );
        // A template beats a catch-all even when the template starts with a placeholder.
        assert_eq!(
            upstream_of(&r, None, "/a/x").unwrap(),
            "ws://h/open-template"
        );
        assert_eq!(
            upstream_of(&r, None, "/a/y").unwrap(),
            "ws://h/keyed-catch-all"
        );
        assert_eq!(
            upstream_of(&r, None, "/b/1").unwrap(),
            "ws://h/keyed-template"
        );
        assert_eq!(
            upstream_of(&r, None, "/c/d/e").unwrap(),
            "ws://h/open-catch-all"
        );
    }

    #[test]
    fn host_key_strips_ports_and_a_trailing_dot() {
        assert_eq!(host_key("Example.COM:80"), "example.com");
        assert_eq!(host_key("[::1]:8080"), "[::1]");
        assert_eq!(host_key("example.com"), "example.com");
        assert_eq!(host_key("Example.com."), "example.com");
        assert_eq!(host_key("example.com.:8080"), "example.com");
        // Only one dot: `example.com..` is not a name.
        assert_eq!(host_key("example.com.."), "example.com.");
    }

    #[test]
    fn a_trailing_dot_names_the_same_host_in_requests_and_config() {
        let r = router(
            r#"
            [[route]]
            path = "/ws"
            upstream = "ws://h/any"
            [[route]]
            path = "/ws"
            host = "admin.example.com"
            upstream = "ws://h/admin"
            [[route]]
            path = "/ws"
            host = "Dotted.Example.com."
            upstream = "ws://h/dotted"
            "#,
        );
        for (host, want) in [
            ("admin.example.com.", "ws://h/admin"),
            ("ADMIN.example.com.:443", "ws://h/admin"),
            ("dotted.example.com", "ws://h/dotted"),
            ("dotted.example.com.", "ws://h/dotted"),
            ("admin.example.com..", "ws://h/any"),
        ] {
            assert_eq!(upstream_of(&r, Some(host), "/ws").unwrap(), want, "{host}");
        }
    }

    #[test]
    fn routes_match_the_normalised_path_and_placeholders_are_checked() {
        let r = router(
            r#"
            [[route]]
            path = "/api/{*rest}"
            upstream = "ws://h/v2/{rest}"
            [[route]]
            path = "/room/{id}"
            upstream = "ws://h/rooms/{id}"
            [[route]]
            path = "/files/{*path}"
            upstream = "ws://h/files/{path}"
            allow_encoded_slash = true
            [[route]]
            path = "/%7Euser"
            upstream = "ws://h/tilde"
            "#,
        );
        let found = r.find(None, "/api/x/./y/../z").unwrap();
        assert_eq!(found.path, "/api/x/z");
        assert_eq!(found.params, [("rest".to_owned(), "x/z".to_owned())]);
        assert_eq!(found.route.upstream.render(&found.params), "ws://h/v2/x/z");
        // Dots resolved before matching: this path is /, which no route serves.
        assert!(matches!(
            r.find(None, "/room/%2e%2e"),
            Err(RouteError::NoRoute(p)) if p == "/"
        ));
        assert_eq!(upstream_of(&r, None, "/~user").unwrap(), "ws://h/tilde");
        assert_eq!(upstream_of(&r, None, "/%7euser").unwrap(), "ws://h/tilde");
        for (path, want) in [
            ("/api/..%2F..%2Fadmin", PathError::DotSegment("rest".into())),
            ("/api/a%2Fb", PathError::EncodedSlash("rest".into())),
            ("/room/a%5cb", PathError::EncodedSlash("id".into())),
            ("/api/x/../../../admin", PathError::AboveRoot),
            ("/api/%zz", PathError::BadPercent),
            (
                "/files/..%2F..%2Fadmin",
                PathError::DotSegment("path".into()),
            ),
            ("/files/..;/admin", PathError::DotSegment("path".into())),
        ] {
            match r.find(None, path) {
                Err(RouteError::BadPath(e)) => assert_eq!(e, want, "{path}"),
                other => panic!("{path}: {:?}", other.map(|m| m.path)),
            }
        }
        // allow_encoded_slash lets an encoded slash through, encoded (in upper case).
        let found = r.find(None, "/files/a%2fb/c").unwrap();
        assert_eq!(
            found.route.upstream.render(&found.params),
            "ws://h/files/a%2Fb/c"
        );
    }
}
