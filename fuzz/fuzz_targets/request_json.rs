#![no_main]
//! cargo-fuzz target: `spike::fuzzing::request_json` (see src/fuzzing.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| spike::fuzzing::request_json(data));
