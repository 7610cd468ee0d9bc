#![no_main]
//! cargo-fuzz target: `spike::fuzzing::recovery_shard` (see src/fuzzing.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| spike::fuzzing::recovery_shard(data));
