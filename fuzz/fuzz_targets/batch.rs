//! Fuzz the RecordBatch v2 header parser and splitter.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(batches) = ferry::batch::split(data) {
        for (range, h) in batches {
            assert_eq!(range.len(), h.total_bytes());
        }
    }
});
