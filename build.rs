//! Link settings for the `spike` executable.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        // Compact relative relocations (DT_RELR, glibc >= 2.36): the position-independent
        // executable's ~37,000 relocations shrink from 0.9 MB that the loader reads at every
        // start (and that then stay resident in every process) to about 11 KB. Measured: a
        // Keeper's resident set drops by 0.6 MB.
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
