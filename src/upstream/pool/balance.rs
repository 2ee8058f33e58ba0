//! Choosing an endpoint: pure functions over the candidates' weights and open connection
//! counts, with no sockets and no clock, so that the distributions are unit-tested exactly.

/// What the chooser knows of one candidate endpoint.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidate<'a> {
    /// The endpoint's URL: what `hash` scores, so that every worker and every gateway with
    /// the same endpoint list agrees.
    pub url: &'a str,
    /// Its configured share.
    pub weight: u32,
    /// Its open connections, across all workers.
    pub open: usize,
}

/// Smooth weighted round robin, as NGINX does it: each pick adds every candidate's weight to
/// its running `current`, takes the largest, and subtracts the total from it. Over a whole
/// round (the sum of the weights) each candidate is taken exactly `weight` times, spread out
/// rather than in runs. `current` is indexed like `candidates`.
pub(crate) fn smooth_round_robin(candidates: &[Candidate<'_>], current: &mut [i64]) -> usize {
    let total: i64 = candidates.iter().map(|c| i64::from(c.weight)).sum();
    let mut best = 0;
    for (i, c) in candidates.iter().enumerate() {
        current[i] += i64::from(c.weight);
        if current[i] > current[best] {
            best = i;
        }
    }
    current[best] -= total;
    best
}

/// The candidate with the fewest open connections relative to its weight; ties go to the
/// first, which `start` rotates so that ties spread.
pub(crate) fn least_connections(candidates: &[Candidate<'_>], start: usize) -> usize {
    let n = candidates.len();
    let load = |c: &Candidate<'_>| (c.open as u128 * 1_000_000) / u128::from(c.weight.max(1));
    (0..n)
        .map(|k| (start + k) % n)
        .min_by_key(|&i| load(&candidates[i]))
        .unwrap_or(0)
}

/// Power of two choices: of two distinct candidates drawn at random (by weight), the one
/// with fewer open connections relative to its weight.
pub(crate) fn random_two(candidates: &[Candidate<'_>], rng: &mut impl rand::RngExt) -> usize {
    let total: u64 = candidates.iter().map(|c| u64::from(c.weight)).sum();
    let mut draw = |skip: Option<usize>| {
        let total = total - skip.map_or(0, |s| u64::from(candidates[s].weight));
        let mut point = rng.random_range(0..total.max(1));
        for (i, c) in candidates.iter().enumerate() {
            if Some(i) == skip {
                continue;
            }
            if point < u64::from(c.weight) {
                return i;
            }
            point -= u64::from(c.weight);
        }
        0
    };
    let a = draw(None);
    if candidates.len() < 2 {
        return a;
    }
    let b = draw(Some(a));
    let load = |c: &Candidate<'_>| (c.open as u128 * 1_000_000) / u128::from(c.weight.max(1));
    if load(&candidates[b]) < load(&candidates[a]) {
        b
    } else {
        a
    }
}

/// Weighted rendezvous (highest random weight) hashing: each candidate scores the key, the
/// highest score wins. Removing a candidate moves only the keys it won; the score depends on
/// nothing but the key, the URL and the weight, so every worker and every gateway instance
/// with the same endpoint list agrees.
pub(crate) fn hash(candidates: &[Candidate<'_>], key: &[u8]) -> usize {
    let mut best = (f64::NEG_INFINITY, 0);
    for (i, c) in candidates.iter().enumerate() {
        let h = mix(fnv1a(fnv1a(FNV_OFFSET, c.url.as_bytes()) ^ 0xff, key));
        // A uniform number in (0, 1), from the top 53 bits.
        let unit = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = -f64::from(c.weight) / unit.ln();
        if score > best.0 {
            best = (score, i);
        }
    }
    best.1
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a: fixed, so that the same key hashes alike in every process and release.
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// splitmix64's finaliser: FNV's low bits are weak on their own.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// An opaque, stable id for an endpoint, for the sticky cookie: a hash of the pool's name and
/// the URL, so that the cookie does not show the address and every gateway instance agrees.
pub(crate) fn endpoint_id(pool: &str, url: &str) -> String {
    let h = mix(fnv1a(
        fnv1a(FNV_OFFSET, pool.as_bytes()) ^ 0x5a,
        url.as_bytes(),
    ));
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates<'a>(urls: &'a [String], weights: &[u32]) -> Vec<Candidate<'a>> {
        urls.iter()
            .zip(weights)
            .map(|(url, &weight)| Candidate {
                url,
                weight,
                open: 0,
            })
            .collect()
    }

    fn urls(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("ws://10.0.0.{i}:9000")).collect()
    }

    #[test]
    fn round_robin_is_exact_over_whole_rounds_and_smooth() {
        let u = urls(3);
        let c = candidates(&u, &[5, 1, 1]);
        let mut current = vec![0; 3];
        let picks: Vec<_> = (0..7 * 10)
            .map(|_| smooth_round_robin(&c, &mut current))
            .collect();
        for i in 0..3 {
            let n = picks.iter().filter(|&&p| p == i).count();
            assert_eq!(n, [50, 10, 10][i]);
        }
        // NGINX's example: a a b a c a a, not a a a a a b c.
        assert_eq!(&picks[..7], &[0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn least_connections_takes_the_least_loaded_by_weight() {
        let u = urls(3);
        let mut c = candidates(&u, &[1, 2, 1]);
        c[0].open = 3;
        c[1].open = 4;
        c[2].open = 3;
        assert_eq!(least_connections(&c, 0), 1);
        c[1].open = 8;
        assert_eq!(least_connections(&c, 0), 0);
        assert_eq!(least_connections(&c, 2), 2);
    }

    #[test]
    fn random_two_avoids_the_loaded_endpoint() {
        let u = urls(3);
        let mut c = candidates(&u, &[1, 1, 1]);
        c[0].open = 100;
        let mut rng = rand::rng();
        let picks: Vec<_> = (0..3000).map(|_| random_two(&c, &mut rng)).collect();
        // Endpoint 0 wins only when drawn twice, which distinct draws never do.
        assert_eq!(picks.iter().filter(|&&p| p == 0).count(), 0);
        let ones = picks.iter().filter(|&&p| p == 1).count();
        assert!((1200..1800).contains(&ones), "{ones}");
    }

    #[test]
    fn hash_moves_only_the_removed_endpoints_keys() {
        let u = urls(10);
        let all = candidates(&u, &[1; 10]);
        let keys: Vec<String> = (0..10_000).map(|k| format!("room-{k}")).collect();
        let before: Vec<&str> = keys
            .iter()
            .map(|k| all[hash(&all, k.as_bytes())].url)
            .collect();
        // Spread: each of 10 endpoints gets about 1,000 keys.
        for url in &u {
            let n = before.iter().filter(|b| **b == url.as_str()).count();
            assert!((850..1150).contains(&n), "{url}: {n}");
        }
        let fewer: Vec<_> = all.iter().copied().filter(|c| c.url != u[3]).collect();
        let mut moved = 0;
        for (k, was) in keys.iter().zip(&before) {
            let now = fewer[hash(&fewer, k.as_bytes())].url;
            if now != *was {
                assert_eq!(*was, u[3], "a key moved off an endpoint that stayed");
                moved += 1;
            }
        }
        let share = moved as f64 / keys.len() as f64;
        assert!((0.08..=0.12).contains(&share), "moved {share}");
        // The same list in another order (another gateway) gives the same answers.
        let mut shuffled = all.clone();
        shuffled.reverse();
        for k in keys.iter().take(500) {
            assert_eq!(
                all[hash(&all, k.as_bytes())].url,
                shuffled[hash(&shuffled, k.as_bytes())].url
            );
        }
    }

    #[test]
    fn hash_follows_weights() {
        let u = urls(2);
        let c = candidates(&u, &[3, 1]);
        let first = (0..8000)
            .filter(|k| hash(&c, format!("k{k}").as_bytes()) == 0)
            .count();
        assert!((5700..6300).contains(&first), "{first}");
    }

    #[test]
    fn endpoint_ids_are_opaque_and_stable() {
        let id = endpoint_id("chat", "ws://10.0.0.1:9000");
        assert_eq!(id, endpoint_id("chat", "ws://10.0.0.1:9000"));
        assert_ne!(id, endpoint_id("chat", "ws://10.0.0.2:9000"));
        assert!(!id.contains("10.0.0.1"));
    }
}
