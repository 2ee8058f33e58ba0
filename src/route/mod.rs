//! Path resolvers: choose the route for a request's host and path.
//!
//! Precedence, documented in docs/configuration.md: routes whose `host` equals the request's host
//! are tried before routes without `host`; within each group an exact literal path beats a
//! template, a template beats a catch-all, and ties go to file order.

mod template;

pub use template::{Params, PathTemplate, Specificity};

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::Route;

/// The chosen route and the placeholder values captured from the path.
#[derive(Debug, Clone)]
pub struct RouteMatch {
    /// The matched route.
    pub route: Arc<Route>,
    /// Path placeholders, in template order.
    pub params: Params,
}

/// Matches requests to routes; built once per configuration snapshot.
#[derive(Debug, Default)]
pub struct Router {
    /// Routes with a `host`, keyed by lower-case host.
    by_host: HashMap<String, Group>,
    /// Routes without a `host`.
    any_host: Group,
}

/// Routes sharing one host key, pre-sorted by precedence.
#[derive(Debug, Default)]
struct Group {
    /// Exact literal paths: one hash look-up. The first route in file order wins a duplicate.
    exact: HashMap<String, Arc<Route>>,
    /// Templates and catch-alls whose first segment is literal, by that segment; each list is
    /// sorted by precedence (templates, then catch-alls, each in file order).
    by_first_segment: HashMap<String, Vec<Arc<Route>>>,
    /// Templates and catch-alls that start with a placeholder, sorted the same way.
    open_first_segment: Vec<Arc<Route>>,
}

/// The precedence of a route among matching ones: lower wins.
fn rank(route: &Route) -> (Specificity, usize) {
    (route.path.specificity(), route.index)
}

impl Group {
    fn insert(&mut self, route: Arc<Route>) {
        if route.path.specificity() == Specificity::Exact {
            self.exact
                .entry(route.path.as_str().to_owned())
                .or_insert(route);
            return;
        }
        let list = match route.path.first_literal() {
            Some(first) => self.by_first_segment.entry(first.to_owned()).or_default(),
            None => &mut self.open_first_segment,
        };
        list.push(route);
        list.sort_by_key(|r| rank(r));
    }

    fn find(&self, path: &str) -> Option<RouteMatch> {
        if let Some(route) = self.exact.get(path) {
            return Some(RouteMatch {
                route: route.clone(),
                params: Params::new(),
            });
        }
        let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
        let first_match = |list: &[Arc<Route>]| {
            list.iter().find_map(|route| {
                route.path.matches(path).map(|params| RouteMatch {
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
            (Some(a), Some(b)) => Some(if rank(&a.route) <= rank(&b.route) {
                a
            } else {
                b
            }),
            (a, b) => a.or(b),
        }
    }
}

impl Router {
    /// Builds a router over `routes`, given in file order.
    pub fn new(routes: &[Arc<Route>]) -> Self {
        let mut router = Router::default();
        for route in routes {
            match &route.host {
                Some(host) => router
                    .by_host
                    .entry(host.to_ascii_lowercase())
                    .or_default()
                    .insert(route.clone()),
                None => router.any_host.insert(route.clone()),
            }
        }
        router
    }

    /// Finds the route for `host` (a Host header value, port allowed) and `path` (no query).
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<RouteMatch> {
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

/// Lower-cases a Host header value and strips its port (`[::1]:80` keeps its brackets).
fn host_key(host: &str) -> String {
    let host = host.trim();
    let without_port = if host.starts_with('[') {
        host.find(']').map_or(host, |i| &host[..=i])
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    without_port.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn router(toml: &str) -> Router {
        let config = Config::from_toml(toml, std::path::Path::new("<test>")).unwrap();
        Router::new(&config.routes)
    }

    fn upstream_of(r: &Router, host: Option<&str>, path: &str) -> Option<String> {
        r.find(host, path)
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
    fn host_key_strips_ports() {
        assert_eq!(host_key("Example.COM:80"), "example.com");
        assert_eq!(host_key("[::1]:8080"), "[::1]");
        assert_eq!(host_key("example.com"), "example.com");
    }
}
