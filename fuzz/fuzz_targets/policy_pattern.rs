#![no_main]
//! cargo-fuzz target: `spike::fuzzing::policy_pattern` (see src/fuzzing.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| spike::fuzzing::policy_pattern(data));
