//! `gw.shared`: a process-wide dictionary that policies on every worker share, for state across
//! connections (counters, flags). Values are strings, numbers or booleans, each with an
//! optional time to live. `incr` is atomic. No Lua here: the Lua binding is in `lua::gw`.

use std::time::{Duration, Instant};

use dashmap::DashMap;

/// A value stored in the dictionary.
#[derive(Debug, Clone, PartialEq)]
pub enum SharedValue {
    /// A string (bytes, as Lua strings are).
    Str(Vec<u8>),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
}

#[derive(Debug)]
struct Entry {
    value: SharedValue,
    expires: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|e| e > now)
    }
}

/// The dictionary. Expired entries are removed when touched, and by [`SharedDict::sweep`].
#[derive(Debug, Default)]
pub struct SharedDict {
    map: DashMap<String, Entry>,
}

/// Why `incr` refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("gw.shared: value at {0:?} is not a number")]
pub struct NotANumber(pub String);

impl SharedDict {
    /// The live value at `key`.
    pub fn get(&self, key: &str) -> Option<SharedValue> {
        let now = Instant::now();
        let entry = self.map.get(key)?;
        if entry.live(now) {
            return Some(entry.value.clone());
        }
        drop(entry);
        self.map.remove_if(key, |_, e| !e.live(now));
        None
    }

    /// Stores `value` at `key`, expiring after `ttl` if given.
    pub fn set(&self, key: &str, value: SharedValue, ttl: Option<Duration>) {
        let expires = ttl.and_then(|t| Instant::now().checked_add(t));
        self.map.insert(key.to_owned(), Entry { value, expires });
    }

    /// Removes `key`.
    pub fn delete(&self, key: &str) {
        self.map.remove(key);
    }

    /// Adds `by` to the number at `key` atomically and returns the new value. A missing or
    /// expired key starts from 0 and gets `ttl`; an existing key keeps its expiry.
    pub fn incr(
        &self,
        key: &str,
        by: SharedValue,
        ttl: Option<Duration>,
    ) -> Result<SharedValue, NotANumber> {
        let now = Instant::now();
        let mut entry = self.map.entry(key.to_owned()).or_insert_with(|| Entry {
            value: SharedValue::Int(0),
            expires: ttl.and_then(|t| now.checked_add(t)),
        });
        if !entry.live(now) {
            *entry = Entry {
                value: SharedValue::Int(0),
                expires: ttl.and_then(|t| now.checked_add(t)),
            };
        }
        let sum = match (&entry.value, &by) {
            (SharedValue::Int(a), SharedValue::Int(b)) => match a.checked_add(*b) {
                Some(s) => SharedValue::Int(s),
                None => SharedValue::Float(*a as f64 + *b as f64),
            },
            (SharedValue::Int(a), SharedValue::Float(b)) => SharedValue::Float(*a as f64 + b),
            (SharedValue::Float(a), SharedValue::Int(b)) => SharedValue::Float(a + *b as f64),
            (SharedValue::Float(a), SharedValue::Float(b)) => SharedValue::Float(a + b),
            _ => return Err(NotANumber(key.to_owned())),
        };
        entry.value = sum.clone();
        Ok(sum)
    }

    /// Removes every expired entry; returns how many are left.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        self.map.retain(|_, e| e.live(now));
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incr_is_atomic_across_threads() {
        let dict = std::sync::Arc::new(SharedDict::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let d = dict.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        d.incr("n", SharedValue::Int(1), None).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(dict.get("n"), Some(SharedValue::Int(40_000)));
    }

    #[test]
    fn ttl_expires_entries() {
        let dict = SharedDict::default();
        dict.set("k", SharedValue::Bool(true), Some(Duration::ZERO));
        assert_eq!(dict.get("k"), None);
        dict.set("k", SharedValue::Str(b"v".to_vec()), None);
        assert_eq!(dict.get("k"), Some(SharedValue::Str(b"v".to_vec())));
        assert!(dict.incr("k", SharedValue::Int(1), None).is_err());
        dict.delete("k");
        assert_eq!(dict.get("k"), None);
    }
}
