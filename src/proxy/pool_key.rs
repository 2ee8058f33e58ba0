//! Reading a pool's `hash_key` and sticky cookie out of an upgrade request. Runs once per
//! upgrade on a pool route, never per message.

use std::net::SocketAddr;

use crate::client_http::RequestHead;
use crate::config::pool::HashKey;
use crate::header_fields::HeaderFields;
use crate::registry::Tags;

/// The `hash` key `source` names, if the request carries it.
pub(super) fn extract(
    source: &HashKey,
    request: &RequestHead,
    params: &[(String, String)],
    peer: SocketAddr,
    tags: &Tags,
) -> Option<String> {
    match source {
        HashKey::Param(name) => params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone()),
        HashKey::Header(name) => request
            .headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned()),
        HashKey::Query(name) => request.query().and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.into_owned())
        }),
        HashKey::Cookie(name) => cookie(&request.headers, name).map(str::to_owned),
        HashKey::ClientIp => Some(peer.ip().to_string()),
        HashKey::Tag(name) => tags.get(name).map(str::to_owned),
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub(super) fn cookie<'a>(headers: &'a HeaderFields, name: &str) -> Option<&'a str> {
    headers
        .get_all("cookie")
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim_matches('"'))
}
