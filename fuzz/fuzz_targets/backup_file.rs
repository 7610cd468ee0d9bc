#![no_main]
//! cargo-fuzz target: `spike::fuzzing::backup_file` (see src/fuzzing.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| spike::fuzzing::backup_file(data));
