//! Tokens already verified, per route and snapshot, like Envoy's `jwt_cache_config`: a client
//! that reconnects presents the same token again, and its RSA signature (about 30 µs) was
//! checked the first time.
//!
//! A hit still checks what can change while the token is cached: its `exp` and `nbf` against
//! the clock (with the route's `leeway`), and that the key that verified it is still one the
//! route holds for the token's `kid` and `alg` (a key dropped from the JWKS stops its tokens,
//! as without the cache). Everything else a verification checks (signature, audience,
//! issuer, required claims) depends only on the token and the snapshot, which owns the cache.
//!
//! Entries are keyed by the token's SHA-256, so the cache holds no bearer token, and a lookup's
//! time says nothing about the tokens it holds. Bounded: two generations of at most
//! [`GENERATION`] entries; when the young one is full it becomes the old one and the previous
//! old one is dropped, so the tokens in use stay and a flood of new ones costs one map.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::Algorithm;

use super::{jwks, Claims, Refusal};

/// The most entries in each of the two generations.
pub(crate) const GENERATION: usize = 1024;

/// Longer tokens are not cached (each entry holds the token's claims): with at most
/// 2 x [`GENERATION`] entries, a route's cache holds at most a few MiB of claims.
pub(crate) const MAX_TOKEN: usize = 4096;

/// What a hit needs to be checked again, and what it answers.
#[derive(Clone)]
pub(crate) struct Entry {
    /// The token itself (compared in constant time on a hit).
    pub(crate) token: Arc<str>,
    pub(crate) claims: Claims,
    pub(crate) kid: Option<Box<str>>,
    pub(crate) alg: Algorithm,
    /// The key whose check succeeded.
    pub(crate) key: Arc<jwks::Key>,
    /// `exp` and `nbf` in seconds since the epoch, as jsonwebtoken compared them.
    pub(crate) exp: u64,
    pub(crate) nbf: Option<u64>,
}

impl Entry {
    /// The refusal jsonwebtoken would give at `now` with `leeway` seconds, if any: the same
    /// comparisons on whole seconds.
    pub(crate) fn expired(&self, now: SystemTime, leeway: u64) -> Option<Refusal> {
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if self.exp < now.saturating_sub(leeway) {
            return Some(Refusal::Invalid("token expired"));
        }
        if self.nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
            return Some(Refusal::Invalid("token not yet valid"));
        }
        None
    }
}

/// The verified tokens of one route (see the module's documentation).
#[derive(Default)]
pub(crate) struct Cache {
    /// The hash's random key.
    keys: RandomState,
    generations: Mutex<Generations>,
}

/// Entries by their token's hash.
#[derive(Default)]
struct Generations {
    young: HashMap<u64, Entry>,
    old: HashMap<u64, Entry>,
}

/// Whether two tokens are equal, in a time that depends on their lengths only.
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len()
        && std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

impl Cache {
    /// The key a token is found by.
    pub(crate) fn hash(&self, token: &str) -> u64 {
        self.keys.hash_one(token)
    }

    /// The entry of `token` (whose [`Cache::hash`] is `hash`), if it was verified before and
    /// is still held.
    pub(crate) fn get(&self, hash: u64, token: &str) -> Option<Entry> {
        let mut g = self.lock();
        if let Some(entry) = g.young.get(&hash) {
            return same(&entry.token, token).then(|| entry.clone());
        }
        // A hit in the old generation moves up, so that tokens in use survive a turnover.
        let entry = g.old.remove(&hash)?;
        if !same(&entry.token, token) {
            return None;
        }
        g.insert(hash, entry.clone());
        Some(entry)
    }

    /// Remembers a token that verified (replacing another of the same hash).
    pub(crate) fn insert(&self, hash: u64, entry: Entry) {
        self.lock().insert(hash, entry);
    }

    /// Forgets the token of this hash (one that no longer passes).
    pub(crate) fn remove(&self, hash: u64) {
        let mut g = self.lock();
        g.young.remove(&hash);
        g.old.remove(&hash);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        // The maps are consistent after any panic (no invariant spans two statements).
        self.generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        let g = self.lock();
        g.young.len() + g.old.len()
    }
}

impl Generations {
    fn insert(&mut self, hash: u64, entry: Entry) {
        if self.young.len() >= GENERATION && !self.young.contains_key(&hash) {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(hash, entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(exp: u64, nbf: Option<u64>) -> Entry {
        token_entry("t", exp, nbf)
    }

    fn token_entry(token: &str, exp: u64, nbf: Option<u64>) -> Entry {
        let key = jsonwebtoken::DecodingKey::from_secret(b"k");
        Entry {
            token: token.into(),
            claims: Claims {
                json: Arc::new(serde_json::json!({})),
                expires: UNIX_EPOCH,
            },
            kid: None,
            alg: Algorithm::HS256,
            key: Arc::new(jwks::Key::new(None, None, key)),
            exp,
            nbf,
        }
    }

    #[test]
    fn bounded_by_two_generations_and_tokens_in_use_stay() {
        let cache = Cache::default();
        let put = |t: &str| cache.insert(cache.hash(t), token_entry(t, 0, None));
        let get = |t: &str| cache.get(cache.hash(t), t);
        put("kept");
        for i in 0..GENERATION * 3 {
            put(&i.to_string());
            if i % (GENERATION / 2) == 0 {
                assert!(get("kept").is_some(), "dropped at {i}");
            }
        }
        assert!(cache.len() <= 2 * GENERATION);
        assert!(get("0").is_none());
        assert!(get(&(GENERATION * 3 - 1).to_string()).is_some());
        cache.remove(cache.hash("kept"));
        assert!(get("kept").is_none());
    }

    #[test]
    fn only_the_same_token_hits() {
        let cache = Cache::default();
        // Stored under another token's hash, as a collision would be.
        cache.insert(cache.hash("a.b.c"), token_entry("a.b.d", 0, None));
        assert!(cache.get(cache.hash("a.b.c"), "a.b.c").is_none());
        assert!(!same("a.b.c", "a.b.cd"));
        assert!(same("a.b.c", "a.b.c"));
    }

    #[test]
    fn a_hit_is_refused_as_jsonwebtoken_would_refuse_it() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        assert!(entry(1_000, None).expired(now, 0).is_none());
        assert!(entry(999, None).expired(now, 0).is_some());
        assert!(entry(970, None).expired(now, 30).is_none());
        assert!(entry(969, None).expired(now, 30).is_some());
        assert!(entry(2_000, Some(1_001)).expired(now, 0).is_some());
        assert!(entry(2_000, Some(1_030)).expired(now, 30).is_none());
    }
}
