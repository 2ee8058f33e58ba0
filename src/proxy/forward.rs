//! What goes upstream, the same for an upgrade and for a request in HTTP mode: the upstream
//! URL (a policy's, or the route's with the client's query) and the request without the
//! client's token (`[route.jwt] strip`).

use std::borrow::Cow;

use http::{HeaderName, HeaderValue};

use crate::config::UpstreamUrl;
use crate::header_fields::HeaderFields;
use crate::jwt::Verifier;

/// Header changes for the upstream request: a name removed (`None`) or set.
pub(crate) type HeaderChanges = Vec<(HeaderName, Option<HeaderValue>)>;

/// The query to pass on and the header changes to make: with `strip`, the token's places are
/// taken out first, so that a header the policy sets afterwards stays.
pub(crate) fn strip_token<'q>(
    jwt: Option<&Verifier>,
    headers: &HeaderFields,
    query: &'q str,
    policy_changes: HeaderChanges,
) -> (Cow<'q, str>, HeaderChanges) {
    match jwt {
        Some(verifier) if verifier.config().strip => {
            let stripped = verifier.strip(headers, query);
            let mut changes = stripped.headers;
            changes.extend(policy_changes);
            (
                stripped.query.map_or(Cow::Borrowed(query), Cow::Owned),
                changes,
            )
        }
        _ => (Cow::Borrowed(query), policy_changes),
    }
}

/// A URL set by a policy is used as given; the route's own URL gets the client's query.
pub(crate) fn upstream_url(
    from_policy: Option<String>,
    template: &UpstreamUrl,
    params: &[(String, String)],
    query: &str,
) -> String {
    if let Some(url) = from_policy {
        return url;
    }
    let mut url = template.render(params);
    if !query.is_empty() {
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(query);
    }
    url
}
