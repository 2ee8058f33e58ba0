//! CORS for the HTTP requests of a route with an `Origin` allow-list (`origins`, issue 15 §3):
//! a request from an origin the list refuses gets 403, as its upgrade would; a preflight
//! (`OPTIONS` with `Access-Control-Request-Method`) from a listed origin is answered here,
//! without the upstream; and the responses to a listed origin's requests say that origin may
//! read them (unless the upstream said so itself). A route without a list is left alone: its
//! requests, preflights included, go upstream as they are, and the upstream does its own CORS.
//!
//! Knows nothing of how origins are matched: the caller says whether the route has a list and
//! whether it lets this request in.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use super::body::{self, ResponseBody};
use crate::client_http::RequestHead;

/// How long a browser may keep a preflight's answer: ten minutes, Chromium's own cap.
const MAX_AGE: &str = "600";

/// What CORS makes of a request.
pub(crate) enum Cors {
    /// The route has no list: nothing to do.
    Pass,
    /// The origin is not on the list (or there is none, and the list wants one): 403.
    Forbidden(String),
    /// A preflight from a listed origin, answered.
    Preflight(Response<ResponseBody>),
    /// A request from a listed origin: its response gets [`allow`] with this origin.
    Allowed(HeaderValue),
}

/// Sorts `head`: `listed`, the route has an `origins` list; `allowed`, that list lets this
/// request's `Origin` in (a missing one with `allow_missing_origin`).
pub(crate) fn check(head: &RequestHead, listed: bool, allowed: bool) -> Cors {
    if !listed {
        return Cors::Pass;
    }
    let origin = head.headers.get("origin");
    if !allowed {
        let shown = origin.map_or_else(
            || "no Origin header".to_owned(),
            |o| String::from_utf8_lossy(o).into_owned(),
        );
        return Cors::Forbidden(shown);
    }
    // A native client without `Origin`, let in by `allow_missing_origin`: not CORS.
    let Some(origin) = origin.and_then(|o| HeaderValue::from_bytes(o).ok()) else {
        return Cors::Pass;
    };
    let requested = head.headers.get("access-control-request-method");
    match requested {
        Some(method) if head.method == Method::OPTIONS => {
            Cors::Preflight(preflight(head, origin, method))
        }
        _ => Cors::Allowed(origin),
    }
}

/// The answer to a listed origin's preflight: the method and headers it asks for are allowed
/// (the list is the operator's trust in that origin), with credentials (cookies, and the
/// `Authorization` SignalR sends).
fn preflight(head: &RequestHead, origin: HeaderValue, method: &[u8]) -> Response<ResponseBody> {
    let mut response = Response::new(body::full(bytes::Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    if let Ok(method) = HeaderValue::from_bytes(method) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, method);
    }
    let asked = head.headers.get("access-control-request-headers");
    if let Some(names) = asked.and_then(|h| HeaderValue::from_bytes(h).ok()) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, names);
    }
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static(MAX_AGE),
    );
    headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    response
}

/// Lets `origin` read a response (with credentials), unless the upstream has answered CORS
/// itself.
pub(crate) fn allow(headers: &mut HeaderMap, origin: HeaderValue) {
    if headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN) {
        return;
    }
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn head(text: &str) -> RequestHead {
        crate::client_http::parse_head(&mut BytesMut::from(text))
            .unwrap()
            .unwrap()
            .0
    }

    const PREFLIGHT: &str = "OPTIONS /hub/negotiate HTTP/1.1\r\nHost: g\r\n\
        Origin: https://app.example.com\r\nAccess-Control-Request-Method: POST\r\n\
        Access-Control-Request-Headers: authorization, x-requested-with\r\n\r\n";

    #[test]
    fn without_a_list_nothing_happens() {
        assert!(matches!(check(&head(PREFLIGHT), false, true), Cors::Pass));
    }

    #[test]
    fn a_listed_origins_preflight_is_answered() {
        let Cors::Preflight(response) = check(&head(PREFLIGHT), true, true) else {
            panic!("not answered as a preflight");
        };
        assert_eq!(response.status(), 204);
        let h = response.headers();
        assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
        assert_eq!(h["access-control-allow-methods"], "POST");
        assert_eq!(
            h["access-control-allow-headers"],
            "authorization, x-requested-with"
        );
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert_eq!(h["vary"], "Origin");
    }

    #[test]
    fn another_origin_is_forbidden_and_a_listed_ones_response_is_allowed() {
        let Cors::Forbidden(shown) = check(&head(PREFLIGHT), true, false) else {
            panic!("not forbidden");
        };
        assert_eq!(shown, "https://app.example.com");
        let get =
            head("GET /socket.io/ HTTP/1.1\r\nHost: g\r\nOrigin: https://app.example.com\r\n\r\n");
        let Cors::Allowed(origin) = check(&get, true, true) else {
            panic!("not allowed");
        };
        let mut headers = HeaderMap::new();
        allow(&mut headers, origin.clone());
        assert_eq!(
            headers["access-control-allow-origin"],
            "https://app.example.com"
        );
        // The upstream's own answer wins.
        let mut own = HeaderMap::new();
        own.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        allow(&mut own, origin);
        assert_eq!(own["access-control-allow-origin"], "*");
        assert!(own.get("access-control-allow-credentials").is_none());
        // A native client without Origin, let in by allow_missing_origin.
        let native = head("GET /socket.io/ HTTP/1.1\r\nHost: g\r\n\r\n");
        assert!(matches!(check(&native, true, true), Cors::Pass));
    }
}
