//! Finding the token in a request (`route.jwt.from`), and taking it out of what goes upstream
//! (`route.jwt.strip`). Pure functions of the request's header fields and query string.

use std::borrow::Cow;

use http::{HeaderName, HeaderValue};

use crate::config::TokenSource;
use crate::header_fields::HeaderFields;

/// The first token found, in the order of `from`; `None` when there is none.
pub(crate) fn find<'a>(
    from: &'a [TokenSource],
    headers: &'a HeaderFields,
    query: &'a str,
) -> Option<Cow<'a, str>> {
    from.iter().find_map(|source| match source {
        TokenSource::Header(name) => headers.get_all(name).find_map(|v| {
            let v = std::str::from_utf8(v).ok()?.trim();
            let bearer = v
                .get(..7)
                .filter(|p| p.eq_ignore_ascii_case("bearer "))
                .map(|_| v[7..].trim());
            // Authorization names its scheme; another header may hold the token alone.
            let token = match (name == "authorization", bearer) {
                (_, Some(t)) => t,
                (true, None) => return None,
                (false, None) => v,
            };
            (!token.is_empty()).then_some(Cow::Borrowed(token))
        }),
        TokenSource::Query(name) => form_urlencoded::parse(query.as_bytes())
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v),
        TokenSource::Cookie(name) => cookies(headers)
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| Cow::Borrowed(v)),
    })
}

/// The request's cookies, `(name, value)`, from every `Cookie` header (quotes removed).
fn cookies(headers: &HeaderFields) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all("cookie")
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            Some((k.trim(), v))
        })
}

/// What `strip` changes in the upstream request.
#[derive(Debug, Default)]
pub(crate) struct Stripped {
    /// Headers to remove (`None`) or replace (the `Cookie` header without the token's cookie).
    pub(crate) headers: Vec<(HeaderName, Option<HeaderValue>)>,
    /// The query string without the token's parameters; `None` when unchanged.
    pub(crate) query: Option<String>,
}

/// Takes every configured token place out of the upstream request: the headers, the query
/// parameters (other parameters are kept as sent), and only the named cookies.
pub(crate) fn strip(from: &[TokenSource], headers: &HeaderFields, query: &str) -> Stripped {
    let mut out = Stripped::default();
    let mut cookie_names = Vec::new();
    let mut query_names = Vec::new();
    for source in from {
        match source {
            TokenSource::Header(name) => {
                if headers.contains(name) {
                    if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                        out.headers.push((name, None));
                    }
                }
            }
            TokenSource::Query(name) => query_names.push(name.as_str()),
            TokenSource::Cookie(name) => cookie_names.push(name.as_str()),
        }
    }
    if !query_names.is_empty() && !query.is_empty() {
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                let name = pair.split('=').next().unwrap_or("");
                let decoded = form_urlencoded::parse(name.as_bytes())
                    .next()
                    .map(|(k, _)| k.into_owned())
                    .unwrap_or_default();
                !query_names.contains(&decoded.as_str())
            })
            .collect();
        let joined = kept.join("&");
        if joined != query {
            out.query = Some(joined);
        }
    }
    if !cookie_names.is_empty() && headers.contains("cookie") {
        let all: Vec<_> = headers
            .get_all("cookie")
            .filter_map(|v| std::str::from_utf8(v).ok())
            .flat_map(|v| v.split(';'))
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        let kept: Vec<&str> = all
            .iter()
            .copied()
            .filter(|p| {
                let name = p.split('=').next().unwrap_or("").trim();
                !cookie_names.contains(&name)
            })
            .collect();
        if kept.len() != all.len() {
            let value = kept.join("; ");
            let value = (!value.is_empty())
                .then(|| HeaderValue::from_str(&value).ok())
                .flatten();
            out.headers.push((http::header::COOKIE, value));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> Vec<TokenSource> {
        vec![
            TokenSource::Header("authorization".into()),
            TokenSource::Query("access_token".into()),
            TokenSource::Cookie("access_token".into()),
        ]
    }

    #[test]
    fn the_first_place_that_holds_a_token_wins() {
        let h = HeaderFields::from_pairs([("Authorization", "Bearer abc")]);
        assert_eq!(
            find(&sources(), &h, "access_token=q").as_deref(),
            Some("abc")
        );
        let h = HeaderFields::from_pairs([("Authorization", "Basic xyz")]);
        assert_eq!(
            find(&sources(), &h, "a=1&access_token=q%2B").as_deref(),
            Some("q+")
        );
        let h = HeaderFields::from_pairs([("Cookie", "x=1; access_token=\"c\"")]);
        assert_eq!(find(&sources(), &h, "").as_deref(), Some("c"));
        assert_eq!(find(&sources(), &HeaderFields::default(), "a=1"), None);
    }

    #[test]
    fn strip_keeps_everything_else() {
        let h = HeaderFields::from_pairs([
            ("Authorization", "Bearer abc"),
            ("Cookie", "a=1; access_token=t; b=2"),
        ]);
        let s = strip(&sources(), &h, "room=1&access_token=t&x=%41");
        assert_eq!(s.query.as_deref(), Some("room=1&x=%41"));
        assert_eq!(s.headers[0], (http::header::AUTHORIZATION, None));
        assert_eq!(
            s.headers[1],
            (
                http::header::COOKIE,
                Some(HeaderValue::from_static("a=1; b=2"))
            )
        );
        let s = strip(&sources(), &HeaderFields::default(), "room=1");
        assert!(s.query.is_none() && s.headers.is_empty());
    }
}
