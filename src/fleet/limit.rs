//! `gw.limit` on the fleet's store: one token bucket per key in Redis (the `take` script),
//! from which each instance leases tokens in batches, behind the calls that use them. No
//! message waits for Redis.
//!
//! - A batch is `rate / 20` tokens (50 ms of the rate), at least 1 and at most `burst`. An
//!   instance asks for the next batch when it holds less than half a batch, plus what it
//!   refused since it last asked (the demand it saw), up to `burst`.
//! - Leased tokens are used within [`LEASE_LIFE`] or dropped: an instance cannot spend later
//!   what the bucket gave it long ago.
//! - An instance out of tokens admits up to one batch on credit while it asks for more (so that
//!   the first message after a quiet spell does not wait for a lease, and is not refused for
//!   want of one); the next leases pay the debt first, and no more credit is given until it is
//!   paid.
//!
//! The bound (docs/policies.md): over any interval `T`, the fleet admits at most
//! `burst + rate × (T + 0.25 s) + N × batch` for a key, `N` being the number of instances:
//! what the bucket gave during `T`, what it gave in the [`LEASE_LIFE`] before (still held),
//! and what each instance owes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::{Fleet, Op};

/// Leased tokens not used within this long are dropped.
pub(super) const LEASE_LIFE: Duration = Duration::from_millis(250);
/// Keys leased for at most; past it, keys not used within a lease's life are forgotten, and a
/// new key is refused while none can be.
pub(super) const MAX_KEYS: usize = 100_000;

#[derive(Debug)]
struct Lease {
    tokens: f64,
    leased_at: Instant,
    used: Instant,
    /// Tokens admitted on credit, before the first lease came.
    debt: f64,
    /// Calls refused since the last ask: the demand the next ask adds.
    refused: f64,
    asking: bool,
}

/// This instance's leases, by key.
#[derive(Debug, Default)]
pub(super) struct Leases {
    keys: DashMap<String, Lease>,
}

/// Tokens asked for at once.
pub(super) fn batch(rate: f64, burst: f64) -> f64 {
    (rate / 20.0).ceil().clamp(1.0, burst.max(1.0))
}

/// Takes a token of bucket `key`; asks for a batch behind the call when it runs low.
pub(super) fn take(fleet: &Arc<Fleet>, key: &str, rate: f64, burst: f64) -> bool {
    let now = Instant::now();
    let size = batch(rate, burst);
    let leases = &fleet.leases.keys;
    let mut ask = None;
    let admitted = {
        let mut lease = match leases.get_mut(key) {
            Some(lease) => lease,
            None => {
                if leases.len() >= MAX_KEYS {
                    leases.retain(|_, l| now.saturating_duration_since(l.used) < LEASE_LIFE);
                    if leases.len() >= MAX_KEYS {
                        return false;
                    }
                }
                leases.entry(key.to_owned()).or_insert(Lease {
                    tokens: 0.0,
                    leased_at: now,
                    used: now,
                    debt: 0.0,
                    refused: 0.0,
                    asking: false,
                })
            }
        };
        lease.used = now;
        if now.saturating_duration_since(lease.leased_at) > LEASE_LIFE {
            lease.tokens = 0.0;
        }
        let admitted = if lease.tokens >= 1.0 {
            lease.tokens -= 1.0;
            true
        } else if lease.debt + 1.0 <= size {
            lease.debt += 1.0;
            true
        } else {
            lease.refused += 1.0;
            false
        };
        if !lease.asking && lease.tokens < size / 2.0 {
            lease.asking = true;
            ask = Some((size + lease.debt + lease.refused).min(burst.max(size + lease.debt)));
            lease.refused = 0.0;
        }
        admitted
    };
    if let Some(want) = ask {
        let (fleet, key) = (fleet.clone(), key.to_owned());
        tokio::spawn(async move { lease(&fleet, key, rate, burst, want).await });
    }
    admitted
}

/// Asks the bucket for `want` tokens and adds what it grants to this instance's lease.
async fn lease(fleet: &Arc<Fleet>, key: String, rate: f64, burst: f64, want: f64) {
    let granted = async {
        let mut conn = fleet.connection(Op::Limit).ok()?;
        let mut invocation = fleet.scripts.take.prepare_invoke();
        invocation
            .key(format!("{}l:{key}", fleet.config.key_prefix))
            .arg(rate)
            .arg(burst)
            .arg(want);
        let asked = invocation.invoke_async::<f64>(&mut conn);
        match tokio::time::timeout(fleet.config.timeout, asked).await {
            Ok(Ok(granted)) => Some(granted),
            Ok(Err(e)) => {
                let _ = fleet.failed(Op::Limit, e);
                None
            }
            Err(_) => {
                fleet.timed_out(Op::Limit);
                None
            }
        }
    }
    .await;
    let Some(mut lease) = fleet.leases.keys.get_mut(&key) else {
        return;
    };
    lease.asking = false;
    let Some(granted) = granted else { return };
    let paid = lease.debt.min(granted);
    lease.debt -= paid;
    let now = Instant::now();
    if now.saturating_duration_since(lease.leased_at) > LEASE_LIFE {
        lease.tokens = 0.0;
    }
    lease.tokens += granted - paid;
    lease.leased_at = now;
}

#[cfg(test)]
mod tests {
    use super::batch;

    #[test]
    fn a_batch_is_50ms_of_the_rate_within_the_burst() {
        assert_eq!(batch(1000.0, 2000.0), 50.0);
        assert_eq!(batch(1.0, 5.0), 1.0);
        assert_eq!(batch(1000.0, 10.0), 10.0);
        assert_eq!(batch(0.5, 0.5), 1.0);
    }
}
