//! JWT authentication of upgrades (`[route.jwt]`): find the token, pick the key, verify the
//! signature and the claims, and say what to strip before the request goes upstream.
//!
//! Owns: [`Verifier`] (one per route and snapshot), the process-wide JWKS cache ([`jwks`])
//! and its HTTPS client (`fetch`). It knows nothing of policies or of the proxy: the proxy
//! calls [`Verifier::authorize`] before `on_upgrade`, and the Lua engine calls
//! [`Verifier::verify_cached`] for `gw.jwt.verify`. Tokens are parsed by `jsonwebtoken`, signatures checked by ring ([`crypto`]).
//!
//! Security invariants: `alg: none` never parses; a token's `alg` must be one of
//! `route.jwt.algorithms`, which holds HMAC algorithms only with `secret_file`; a JWKS never
//! supplies an HMAC key; `exp` is always required.

mod cache;
mod crypto;
mod fetch;
pub mod jwks;
pub(crate) mod token;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, Validation};

use crate::config::{JwtConfig, JwtKeys};
use crate::header_fields::HeaderFields;

pub(crate) use token::Stripped;

/// Why a token was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    /// No token in any of the places `route.jwt.from` names.
    #[error("no token")]
    Missing,
    /// The token is not valid: the short reason (`error_description`).
    #[error("{0}")]
    Invalid(&'static str),
    /// The gateway holds no keys to verify it with (the IdP was never reached): 503.
    #[error("no verification keys (the identity provider is unreachable)")]
    NoKeys,
}

impl Refusal {
    /// 401, or 503 when the gateway holds no keys.
    pub fn status(&self) -> http::StatusCode {
        match self {
            Refusal::NoKeys => http::StatusCode::SERVICE_UNAVAILABLE,
            _ => http::StatusCode::UNAUTHORIZED,
        }
    }

    /// The `WWW-Authenticate` value of a 401 (RFC 6750 §3); `None` for a 503.
    pub fn www_authenticate(&self) -> Option<http::HeaderValue> {
        if matches!(self, Refusal::NoKeys) {
            return None;
        }
        let value = format!("Bearer error=\"invalid_token\", error_description=\"{self}\"");
        http::HeaderValue::from_str(&value).ok()
    }
}

/// A verified token's claims.
#[derive(Debug, Clone)]
pub struct Claims {
    /// The payload, a JSON object.
    pub json: Arc<serde_json::Value>,
    /// `exp`, as a time.
    pub expires: SystemTime,
}

/// A route's token verification: its settings and its keys.
pub struct Verifier {
    config: Arc<JwtConfig>,
    keys: Keys,
    /// Built once: the settings every verification shares (its `algorithms` is set per token).
    validation: Validation,
    /// Tokens verified before (see [`cache`]).
    cache: cache::Cache,
}

enum Keys {
    Static(Arc<jwks::Key>),
    Fetched(Arc<jwks::Jwks>),
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("config", &self.config)
            .finish()
    }
}

impl Verifier {
    /// Builds the verifier of a route: a key file's key, or the shared JWKS cache entry of
    /// its URL (nothing is fetched yet).
    pub fn new(config: Arc<JwtConfig>) -> Result<Verifier, String> {
        crypto::install();
        let keys = match &config.keys {
            JwtKeys::PublicKey(k) | JwtKeys::Secret(k) => {
                let key = k
                    .decoding_key()
                    .ok_or_else(|| format!("{}: not a usable key", k.path.display()))?;
                Keys::Static(Arc::new(jwks::Key::single(key)))
            }
            JwtKeys::Issuer(url) | JwtKeys::JwksUrl(url) => {
                let source = match &config.keys {
                    JwtKeys::Issuer(_) => jwks::Source::Issuer(url.clone()),
                    _ => jwks::Source::Url(url.clone()),
                };
                let tls = || {
                    crate::upstream::client_config(&crate::config::UpstreamTls {
                        ca_file: config.ca_file.clone(),
                        insecure_skip_verify: false,
                    })
                };
                Keys::Fetched(jwks::entry(source, config.ca_file.clone(), tls)?)
            }
        };
        let mut validation = Validation::new(config.algorithms[0]);
        validation.leeway = config.leeway.as_secs();
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if config.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&config.audience);
            required.push("aud");
        }
        if let JwtKeys::Issuer(issuer) = &config.keys {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Verifier {
            config,
            keys,
            validation,
            cache: cache::Cache::default(),
        })
    }

    /// The route's settings.
    pub fn config(&self) -> &JwtConfig {
        &self.config
    }

    /// Finds the request's token and verifies it, waiting at most `wait` for keys that must
    /// be fetched first.
    pub async fn authorize(
        &self,
        headers: &HeaderFields,
        query: &str,
        wait: Duration,
    ) -> Result<Claims, Refusal> {
        let token = token::find(&self.config.from, headers, query).ok_or(Refusal::Missing)?;
        self.verify(&token, wait).await
    }

    /// What `strip` takes out of the upstream request (nothing when `strip` is off).
    pub(crate) fn strip(&self, headers: &HeaderFields, query: &str) -> Stripped {
        if !self.config.strip {
            return Stripped::default();
        }
        token::strip(&self.config.from, headers, query)
    }

    /// Verifies `token`, waiting at most `wait` for a fetch of the keys. A token verified
    /// before is answered from the route's [`cache`] after its times and key are checked again.
    pub async fn verify(&self, token: &str, wait: Duration) -> Result<Claims, Refusal> {
        let hash = (token.len() <= cache::MAX_TOKEN).then(|| self.cache.hash(token));
        if let Some(hash) = hash {
            if let Some(hit) = self.cache.get(hash, token) {
                let keys = self.keys(hit.kid.as_deref(), hit.alg, wait).await?;
                if keys.iter().any(|k| Arc::ptr_eq(k, &hit.key)) {
                    return match hit.expired(SystemTime::now(), self.validation.leeway) {
                        None => Ok(hit.claims),
                        Some(refusal) => Err(refusal),
                    };
                }
                // Not the key held now (rotated out, or the JWKS was fetched again): verify in full.
                self.cache.remove(hash);
            }
        }
        let header = self.header(token)?;
        let keys = self.keys(header.kid.as_deref(), header.alg, wait).await?;
        let (claims, entry) = self.check(token, header, keys)?;
        if let Some(hash) = hash {
            self.cache.insert(hash, entry);
        }
        Ok(claims)
    }

    /// Verifies `token` with the keys held now, without waiting (for policies, which cannot
    /// wait). An unknown key id starts a fetch in the background, rate-limited as for upgrades.
    pub fn verify_cached(&self, token: &str) -> Result<Claims, Refusal> {
        // With no wait, the future completes at its first poll.
        futures_util::FutureExt::now_or_never(self.verify(token, Duration::ZERO))
            .unwrap_or(Err(Refusal::NoKeys))
    }

    /// The keys that may have signed a token with this `kid` and `alg`.
    async fn keys(
        &self,
        kid: Option<&str>,
        alg: jsonwebtoken::Algorithm,
        wait: Duration,
    ) -> Result<Vec<Arc<jwks::Key>>, Refusal> {
        match &self.keys {
            Keys::Static(key) => Ok(vec![key.clone()]),
            Keys::Fetched(jwks) => jwks.keys_for(kid, alg, wait).await.map_err(missing),
        }
    }

    fn header(&self, token: &str) -> Result<jsonwebtoken::Header, Refusal> {
        // `alg: none` (and any algorithm jsonwebtoken does not know) fails here.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Refusal::Invalid("malformed token or unsupported algorithm"))?;
        if !self.config.algorithms.contains(&header.alg) {
            return Err(Refusal::Invalid("algorithm not accepted"));
        }
        Ok(header)
    }

    /// Checks the signature with each of `keys` until one fits, then the claims; returns the
    /// claims and the cache entry that remembers them.
    fn check(
        &self,
        token: &str,
        header: jsonwebtoken::Header,
        keys: Vec<Arc<jwks::Key>>,
    ) -> Result<(Claims, cache::Entry), Refusal> {
        if keys.is_empty() {
            return Err(Refusal::Invalid("no key for this algorithm"));
        }
        let mut validation = self.validation.clone();
        validation.algorithms = vec![header.alg];
        let mut last = Refusal::Invalid("bad signature");
        for key in keys {
            match jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &validation) {
                Ok(data) => {
                    let claims = self.claims(data.claims)?;
                    let number = |name| claims.json.get(name).and_then(serde_json::Value::as_u64);
                    let entry = cache::Entry {
                        token: token.into(),
                        exp: number("exp").ok_or(Refusal::Invalid("bad exp claim"))?,
                        nbf: number("nbf"),
                        claims: claims.clone(),
                        kid: header.kid.map(String::into_boxed_str),
                        alg: header.alg,
                        key,
                    };
                    return Ok((claims, entry));
                }
                Err(e) => {
                    last = Refusal::Invalid(describe(e.kind()));
                    if !matches!(e.kind(), ErrorKind::InvalidSignature) {
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    fn claims(&self, json: serde_json::Value) -> Result<Claims, Refusal> {
        for (claim, wanted) in &self.config.required {
            let value = json.get(claim);
            if !wanted.iter().all(|w| holds(value, w)) {
                return Err(Refusal::Invalid("a required claim is missing"));
            }
        }
        let exp = json
            .get("exp")
            .and_then(serde_json::Value::as_f64)
            .filter(|e| *e >= 0.0)
            .ok_or(Refusal::Invalid("bad exp claim"))?;
        let expires = Duration::try_from_secs_f64(exp)
            .ok()
            .and_then(|d| UNIX_EPOCH.checked_add(d))
            .ok_or(Refusal::Invalid("bad exp claim"))?;
        Ok(Claims {
            json: Arc::new(json),
            expires,
        })
    }
}

fn missing(m: jwks::Missing) -> Refusal {
    match m {
        jwks::Missing::NoKeys => Refusal::NoKeys,
        jwks::Missing::UnknownKid => Refusal::Invalid("unknown key id"),
    }
}

/// Whether a claim holds `wanted`: equal to it, a list that contains it, or a space-separated
/// string (such as `scope`) that has it as a word.
fn holds(value: Option<&serde_json::Value>, wanted: &str) -> bool {
    use serde_json::Value;
    match value {
        Some(Value::String(s)) => s == wanted || s.split_ascii_whitespace().any(|w| w == wanted),
        Some(Value::Array(items)) => items.iter().any(|i| holds(Some(i), wanted)),
        Some(Value::Bool(b)) => b.to_string() == wanted,
        Some(Value::Number(n)) => n.to_string() == wanted,
        _ => false,
    }
}

/// The short reason for a refusal, as the client sees it.
fn describe(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "token expired",
        ErrorKind::ImmatureSignature => "token not yet valid",
        ErrorKind::InvalidAudience => "wrong audience",
        ErrorKind::InvalidIssuer => "wrong issuer",
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::InvalidAlgorithm => "algorithm does not fit the key",
        ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
        _ => "malformed token",
    }
}

impl jwks::Key {
    /// A key from a file: no `kid`, any algorithm of its family (the configuration has
    /// checked `algorithms` against it).
    fn single(key: DecodingKey) -> jwks::Key {
        jwks::Key::new(None, None, key)
    }
}

#[cfg(test)]
mod tests {
    use super::holds;
    use serde_json::json;

    #[test]
    fn required_values_match_words_list_items_and_equal_strings() {
        let scope = json!("openid chat admin");
        assert!(holds(Some(&scope), "chat"));
        assert!(!holds(Some(&scope), "cha"));
        assert!(holds(Some(&json!(["a", "chat"])), "chat"));
        assert!(holds(Some(&json!(true)), "true"));
        assert!(!holds(None, "chat"));
    }
}
