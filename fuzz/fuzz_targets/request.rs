//! Fuzz the Kafka request decoder: any frame must decode or be refused, never panic or abort
//! (the unpatched kafka-protocol crate aborted on huge array counts).
//! Run: `cargo fuzz run request -s none -- -rss_limit_mb=512` from the repo root.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut frame = bytes::Bytes::copy_from_slice(data);
    let _ = ferry::kafka::decode(&mut frame);
});
