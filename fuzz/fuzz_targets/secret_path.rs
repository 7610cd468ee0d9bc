#![no_main]
//! cargo-fuzz target: `spike::fuzzing::secret_path` (see src/fuzzing.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| spike::fuzzing::secret_path(data));
