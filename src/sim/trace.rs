//! The trace of a run: every event as one canonical text line, hashed (64-bit FNV-1a) as it
//! happens, with the last lines kept for failure reports.
//!
//! Owns: the hash and the ring of recent lines. Does not own: what the lines say (the
//! simulator writes them). Two runs of the same seed write the same lines in the same order, so
//! their hashes are equal; any change in event order or content changes the hash.

use std::collections::VecDeque;

/// How many recent lines a failure report shows.
pub const KEEP: usize = 20;

#[derive(Debug, Clone)]
pub struct Trace {
    hash: u64,
    events: u64,
    recent: VecDeque<String>,
    /// Keep every line (for `--verbose` style debugging); off by default.
    pub keep_all: bool,
    pub all: Vec<String>,
}

impl Default for Trace {
    fn default() -> Self {
        Trace::new()
    }
}

impl Trace {
    pub fn new() -> Trace {
        Trace {
            hash: 0xcbf2_9ce4_8422_2325,
            events: 0,
            recent: VecDeque::with_capacity(KEEP + 1),
            keep_all: false,
            all: Vec::new(),
        }
    }

    /// Record one event line.
    pub fn push(&mut self, line: String) {
        for b in line.as_bytes().iter().chain(b"\n") {
            self.hash ^= *b as u64;
            self.hash = self.hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.events += 1;
        if self.keep_all {
            self.all.push(line.clone());
        }
        if self.recent.len() == KEEP {
            self.recent.pop_front();
        }
        self.recent.push_back(line);
    }

    pub fn hash(&self) -> u64 {
        self.hash
    }

    pub fn events(&self) -> u64 {
        self.events
    }

    pub fn recent(&self) -> Vec<String> {
        self.recent.iter().cloned().collect()
    }
}
