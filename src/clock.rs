//! The wall clock, in one place: Unix milliseconds for record timestamps, reports and fence
//! deadlines. Leases and timeouts use monotonic time instead (`Instant`, or the time a sans-IO
//! core is given).
//!
//! A leaf: it imports nothing of Ferry's.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
