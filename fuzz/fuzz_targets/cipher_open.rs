#![no_main]
//! cargo-fuzz target: `spike::fuzzing::cipher_open` (see src/fuzzing.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| spike::fuzzing::cipher_open(data));
