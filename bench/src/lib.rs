//! framegate's benchmark harness: `fg-echo` (the upstream every proxy fronts), `fg-load` (the
//! load generator) and `run.py` (the orchestrator). docs/performance.md explains how to run it.
//! `pmd`: permessage-deflate and the minimal framing their compressing connections use;
//! `deflate_load`: `fg-load --deflate`.

pub mod deflate_load;
pub mod pmd;

use std::time::Duration;

/// Parses "3s", "500ms" or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Some(ms) = text.strip_suffix("ms") {
        return ms
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|e| e.to_string());
    }
    let secs = text.strip_suffix('s').unwrap_or(text);
    secs.parse::<f64>()
        .map(Duration::from_secs_f64)
        .map_err(|e| e.to_string())
}
