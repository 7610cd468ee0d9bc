#![no_main]
//! cargo-fuzz target: `spike::fuzzing::spike_store` (see src/fuzzing.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| spike::fuzzing::spike_store(data));
