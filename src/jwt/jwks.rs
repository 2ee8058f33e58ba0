//! The JWKS cache: one entry per key URL (and CA file) in the process, shared by every worker
//! and every snapshot that names it, so that a reload that keeps the URL keeps the keys.
//!
//! Fetches run in their own task (never in a handshake's future, never blocking a worker):
//! at first use, when the keys are older than their `Cache-Control: max-age` (else an hour),
//! and when a token names a key id the set does not hold — at most once per
//! [`UNKNOWN_KID_INTERVAL`], so that made-up key ids cannot make the gateway hammer the IdP.
//! A failed fetch keeps the keys held (logged once per outage) and is retried after
//! [`RETRY_AFTER`]. A handshake waits for a fetch it needs at most the time it is given.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use tokio::sync::watch;
use tokio::time::Instant;

use super::fetch;

/// At most this often a token's unknown `kid` makes the keys be fetched again.
pub const UNKNOWN_KID_INTERVAL: Duration = Duration::from_secs(10);
/// After a failed fetch, the next one is tried no sooner than this.
pub const RETRY_AFTER: Duration = Duration::from_secs(10);
/// Keys without a `max-age` are fetched again after this.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(3600);
/// A `max-age` is held within these bounds.
const REFRESH_BOUNDS: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(86_400));
/// One fetch (discovery plus JWKS) may take this long.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many keys are taken from a JWKS document.
pub const MAX_KEYS: usize = 64;

/// Where the keys come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    /// OIDC discovery at this issuer.
    Issuer(String),
    /// A JWKS URL.
    Url(String),
}

impl Source {
    fn shown(&self) -> &str {
        match self {
            Source::Issuer(s) | Source::Url(s) => s,
        }
    }
}

/// One verification key of a set.
pub(crate) struct Key {
    kid: Option<String>,
    /// The JWK's `alg`, when it names one: then only that algorithm may use the key.
    alg: Option<Algorithm>,
    family: AlgorithmFamily,
    pub(crate) key: DecodingKey,
}

impl Key {
    pub(crate) fn new(kid: Option<String>, alg: Option<Algorithm>, key: DecodingKey) -> Key {
        Key {
            kid,
            alg,
            family: key.family(),
            key,
        }
    }
}

/// The keys of one fetch.
#[derive(Default)]
pub(crate) struct KeySet {
    keys: Vec<Arc<Key>>,
}

/// What a set holds for a token.
pub(crate) enum Lookup {
    /// The keys that may verify it (by `kid`, or every key of the algorithm's family when the
    /// token names none).
    Found(Vec<Arc<Key>>),
    /// The token names a key id the set does not hold.
    UnknownKid,
}

impl KeySet {
    pub(crate) fn lookup(&self, kid: Option<&str>, alg: Algorithm) -> Lookup {
        let fits =
            |k: &&Arc<Key>| k.family.algorithms().contains(&alg) && k.alg.is_none_or(|a| a == alg);
        match kid {
            Some(kid) => {
                let named: Vec<_> = self
                    .keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid))
                    .collect();
                if named.is_empty() {
                    Lookup::UnknownKid
                } else {
                    Lookup::Found(named.into_iter().filter(fits).cloned().collect())
                }
            }
            None => Lookup::Found(self.keys.iter().filter(fits).cloned().collect()),
        }
    }

    /// Parses a JWKS document: signature keys of the kinds supported, at most [`MAX_KEYS`];
    /// others (encryption keys, unknown types) are skipped.
    pub(crate) fn parse(body: &[u8]) -> Result<KeySet, String> {
        #[derive(serde::Deserialize)]
        struct Doc {
            keys: Vec<serde_json::Value>,
        }
        let doc: Doc =
            serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut keys = Vec::new();
        for raw in doc.keys.into_iter() {
            if keys.len() == MAX_KEYS {
                break;
            }
            if raw
                .get("use")
                .and_then(|u| u.as_str())
                .is_some_and(|u| u != "sig")
            {
                continue;
            }
            let alg = match raw.get("alg").and_then(|a| a.as_str()) {
                None => None,
                Some(a) => match a.parse::<Algorithm>() {
                    Ok(a) => Some(a),
                    Err(_) => continue,
                },
            };
            let Ok(jwk) = serde_json::from_value::<jsonwebtoken::jwk::Jwk>(raw) else {
                continue;
            };
            let Ok(key) = DecodingKey::from_jwk(&jwk) else {
                continue;
            };
            let family = key.family();
            // A JWKS never supplies an HMAC secret: that would let a token choose HS256.
            if family == AlgorithmFamily::Hmac {
                continue;
            }
            keys.push(Arc::new(Key::new(jwk.common.key_id.clone(), alg, key)));
        }
        if keys.is_empty() {
            return Err("the JWKS document holds no usable signature key".into());
        }
        Ok(KeySet { keys })
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }
}

/// The cached keys of one source.
pub(crate) struct Jwks {
    source: Source,
    tls: Arc<rustls::ClientConfig>,
    state: Mutex<State>,
    /// Counts finished fetches: a handshake waiting for keys waits for it to move.
    fetched: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    keys: Option<Arc<KeySet>>,
    fetching: bool,
    /// When the keys should be fetched again (`None`: never fetched).
    refresh_at: Option<Instant>,
    /// The last fetch started for an unknown `kid`.
    kid_fetch: Option<Instant>,
    /// The last fetch failed (logged once per outage).
    outage: bool,
}

type CacheKey = (Source, Option<PathBuf>);

static CACHE: LazyLock<Mutex<HashMap<CacheKey, Weak<Jwks>>>> = LazyLock::new(Default::default);

/// The process's entry for `source` fetched with `tls` (`ca_file` tells them apart): the one
/// a live snapshot already uses, or a new one.
pub(crate) fn entry(
    source: Source,
    ca_file: Option<PathBuf>,
    tls: impl FnOnce() -> Result<Arc<rustls::ClientConfig>, String>,
) -> Result<Arc<Jwks>, String> {
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    cache.retain(|_, w| w.strong_count() > 0);
    let key = (source, ca_file);
    if let Some(found) = cache.get(&key).and_then(Weak::upgrade) {
        return Ok(found);
    }
    let jwks = Arc::new(Jwks {
        source: key.0.clone(),
        tls: tls()?,
        state: Mutex::default(),
        fetched: watch::channel(0).0,
    });
    cache.insert(key, Arc::downgrade(&jwks));
    Ok(jwks)
}

/// Why no key could be found.
pub(crate) enum Missing {
    /// The gateway holds no keys for the source (never fetched, or every fetch failed).
    NoKeys,
    /// The keys held do not include the token's `kid`.
    UnknownKid,
}

impl Jwks {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The keys that may verify a token naming `kid` with `alg`, waiting at most `wait` for a
    /// fetch this needs (none when `wait` is zero: then only a background fetch is started).
    pub(crate) async fn keys_for(
        self: &Arc<Self>,
        kid: Option<&str>,
        alg: Algorithm,
        wait: Duration,
    ) -> Result<Vec<Arc<Key>>, Missing> {
        let mut waited = false;
        loop {
            let mut seen = self.fetched.subscribe();
            let (keys, started) = {
                let mut state = self.state();
                let now = Instant::now();
                let lookup = state.keys.as_ref().map(|k| k.lookup(kid, alg));
                let want = match &lookup {
                    Some(Lookup::Found(_)) => state.refresh_at.is_some_and(|at| now >= at),
                    Some(Lookup::UnknownKid) => {
                        let allowed = state
                            .kid_fetch
                            .is_none_or(|at| now >= at + UNKNOWN_KID_INTERVAL);
                        if allowed && !waited && !state.fetching {
                            state.kid_fetch = Some(now);
                        }
                        allowed && !waited
                    }
                    None => state.refresh_at.is_none_or(|at| now >= at),
                };
                let started = want && !state.fetching && self.start(&mut state);
                (lookup, started || state.fetching)
            };
            match keys {
                Some(Lookup::Found(keys)) => return Ok(keys),
                _ if !started || waited || wait.is_zero() => {
                    return Err(match keys {
                        None => Missing::NoKeys,
                        _ => Missing::UnknownKid,
                    })
                }
                _ => {}
            }
            waited = true;
            let _ = tokio::time::timeout(wait, seen.changed()).await;
        }
    }

    /// Starts a fetch in its own task; false when there is no runtime to run it.
    fn start(self: &Arc<Self>, state: &mut State) -> bool {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        state.fetching = true;
        let this = self.clone();
        runtime.spawn(async move {
            // Clears `fetching` even if the runtime drops the task half-way.
            let guard = Fetching(this.clone());
            let fetched = tokio::time::timeout(FETCH_TIMEOUT, this.fetch()).await;
            let fetched =
                fetched.unwrap_or_else(|_| Err(format!("no answer within {FETCH_TIMEOUT:?}")));
            this.done(fetched);
            drop(guard);
        });
        true
    }

    async fn fetch(&self) -> Result<(KeySet, Option<Duration>), String> {
        let url = match &self.source {
            Source::Url(url) => url.clone(),
            Source::Issuer(issuer) => {
                let discovery = format!("{issuer}/.well-known/openid-configuration");
                let doc = fetch::get(&discovery, &self.tls).await?;
                #[derive(serde::Deserialize)]
                struct Discovery {
                    issuer: String,
                    jwks_uri: String,
                }
                let d: Discovery = serde_json::from_slice(&doc.body)
                    .map_err(|e| format!("{discovery}: not an OpenID configuration: {e}"))?;
                if d.issuer.trim_end_matches('/') != issuer {
                    return Err(format!(
                        "{discovery}: names issuer {:?}, not {issuer:?}",
                        d.issuer
                    ));
                }
                d.jwks_uri
            }
        };
        let doc = fetch::get(&url, &self.tls).await?;
        let set = KeySet::parse(&doc.body).map_err(|e| format!("{url}: {e}"))?;
        Ok((set, doc.max_age))
    }

    fn done(&self, fetched: Result<(KeySet, Option<Duration>), String>) {
        let mut state = self.state();
        let now = Instant::now();
        match fetched {
            Ok((set, max_age)) => {
                let refresh = max_age
                    .unwrap_or(DEFAULT_REFRESH)
                    .clamp(REFRESH_BOUNDS.0, REFRESH_BOUNDS.1);
                if state.outage {
                    tracing::info!(
                        jwks = self.source.shown(),
                        keys = set.len(),
                        "JWKS fetched again"
                    );
                }
                tracing::debug!(jwks = self.source.shown(), keys = set.len(), "JWKS fetched");
                state.keys = Some(Arc::new(set));
                state.refresh_at = Some(now + refresh);
                state.outage = false;
            }
            Err(error) => {
                if !state.outage {
                    let held = state.keys.as_ref().map_or(0, |k| k.len());
                    tracing::warn!(
                        jwks = self.source.shown(),
                        %error,
                        cached_keys = held,
                        "JWKS fetch failed; the cached keys stay in use (logged once until a fetch succeeds)"
                    );
                }
                state.outage = true;
                state.refresh_at = Some(now + RETRY_AFTER);
            }
        }
        state.fetching = false;
        drop(state);
        self.fetched.send_modify(|n| *n += 1);
    }
}

struct Fetching(Arc<Jwks>);

impl Drop for Fetching {
    fn drop(&mut self) {
        let mut state = self.0.state();
        if state.fetching {
            state.fetching = false;
            drop(state);
            self.0.fetched.send_modify(|n| *n += 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const N: &str = "sFRwHdZ1ez9ZjN4Atg4ShOLiEG8sRyUd84Ck5aLAoZ5eWloEwTInj73jNjbd5_6pGJXtA58DL9tu3CfwXgH00ya89kW0w79Ada9uhrM4kEhrRCnkl7hhk92o0p1wBh7Z_yW6kndCqx09FfGppLPSvB8HJdmXes-pSzMto4wZ1TYnMqo0AEPEu7kBJD21iaMWBjEqaLsfKI2dlgrVDETEhIbH5jxO6mN8jBKrSgxxGT2MI0H7EFBHVuy5D8vxY-zECy264k1i795sZEbatAgGPnfeDLXdm1WlJU-thzjXheY-xkepLxDNK5PbcTyrfLPpERwIOCuKZDKuSlKPPlMdjw";

    fn rsa(kid: &str) -> serde_json::Value {
        json!({ "kty": "RSA", "kid": kid, "e": "AQAB", "n": N })
    }

    #[test]
    fn only_signature_keys_of_supported_kinds_are_taken_and_never_a_secret() {
        let mut enc = rsa("enc");
        enc["use"] = "enc".into();
        let mut ps = rsa("ps");
        ps["alg"] = "PS256".into();
        let doc = json!({ "keys": [
            { "kty": "oct", "kid": "secret", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA" },
            enc,
            { "kty": "RSA", "kid": "odd", "alg": "RSA-OAEP", "e": "AQAB", "n": N },
            { "kty": "XYZ", "kid": "unknown" },
            ps,
            rsa("sig"),
        ]});
        let set = KeySet::parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!(set.len(), 2);
        let found = |kid, alg| match set.lookup(Some(kid), alg) {
            Lookup::Found(keys) => keys.len(),
            Lookup::UnknownKid => usize::MAX,
        };
        assert_eq!(
            found("secret", Algorithm::HS256),
            usize::MAX,
            "no HMAC key from a JWKS"
        );
        assert_eq!(found("sig", Algorithm::RS256), 1);
        assert_eq!(
            found("sig", Algorithm::ES256),
            0,
            "the key's family decides"
        );
        assert_eq!(found("ps", Algorithm::RS256), 0, "the key's alg decides");
        assert_eq!(found("ps", Algorithm::PS256), 1);
        match set.lookup(None, Algorithm::RS256) {
            Lookup::Found(keys) => assert_eq!(keys.len(), 1),
            Lookup::UnknownKid => panic!("no kid looks at every key"),
        }
    }

    #[test]
    fn a_jwks_gives_at_most_max_keys_and_must_give_one() {
        let keys: Vec<_> = (0..MAX_KEYS + 10).map(|i| rsa(&i.to_string())).collect();
        let set = KeySet::parse(json!({ "keys": keys }).to_string().as_bytes()).unwrap();
        assert_eq!(set.len(), MAX_KEYS);
        let none = KeySet::parse(br#"{"keys":[{"kty":"oct","k":"AAAA"}]}"#);
        assert!(none.is_err_and(|e| e.contains("no usable signature key")));
        assert!(KeySet::parse(b"<html>").is_err());
    }
}
