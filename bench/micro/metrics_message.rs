//! Cost of `RouteMetrics::message`, the per-message metrics call, in an optimised build.
//! The module is std-only, so it builds without cargo (and without the rest of the gateway):
//!
//! ```sh
//! rustc -O --edition 2021 -o /tmp/metrics_message bench/micro/metrics_message.rs && /tmp/metrics_message
//! ```
#![allow(dead_code)]

#[path = "../../src/metrics/route.rs"]
mod route;

use std::hint::black_box;
use std::time::Instant;

use route::{Direction, RouteMetrics};

fn main() {
    let set = std::sync::Arc::new(RouteMetrics::default());
    let n: u64 = 200_000_000;
    for round in 0..3 {
        let start = Instant::now();
        for i in 0..n {
            let dir = if i & 2 == 0 {
                Direction::ClientToUpstream
            } else {
                Direction::UpstreamToClient
            };
            // Sizes spread over every bucket so that the bucket index is not predictable.
            let bytes = black_box(((i.wrapping_mul(2654435761)) >> 40) as usize);
            black_box(&*set).message(dir, i & 1 == 0, bytes);
        }
        let ns = start.elapsed().as_nanos() as f64 / n as f64;
        println!("round {round}: RouteMetrics::message {ns:.2} ns/call");
    }
    // Same loop without the call: what the loop itself costs.
    let start = Instant::now();
    let mut acc = 0usize;
    for i in 0..n {
        acc = acc.wrapping_add(black_box(((i.wrapping_mul(2654435761)) >> 40) as usize));
    }
    black_box(acc);
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    println!("empty loop: {ns:.2} ns/iteration");
}
