#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! The shipped systemd units are valid: `systemd-analyze verify` accepts them with no warning
//! (unknown keys, bad values), with ExecStart pointed at the binary under test.

mod common;

use std::process::Command;

#[test]
fn systemd_units_verify_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let mut units = Vec::new();
    for unit in ["spike-nexus.service", "spike-keeper.service"] {
        let text = std::fs::read_to_string(format!("{root}/systemd/{unit}")).unwrap();
        assert!(text.contains("ExecStart=/usr/bin/spike "), "{unit}");
        for key in [
            "Type=notify",
            "Restart=always",
            "WatchdogSec=30",
            "MemorySwapMax=0",
            "LimitCORE=0",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "PrivateDevices=yes",
            "CapabilityBoundingSet=",
            "User=spike",
        ] {
            assert!(text.lines().any(|l| l == key), "{unit} lacks {key}");
        }
        assert!(text.contains("EnvironmentFile=/etc/spike/"), "{unit}");
        let path = dir.path().join(unit);
        std::fs::write(&path, text.replace("/usr/bin/spike", common::spike_bin())).unwrap();
        units.push(path);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .expect("systemd-analyze is installed (Debian package systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let complaints: Vec<&str> = stderr.lines().filter(|l| l.contains("spike-")).collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze warned: {complaints:?}"
    );
}
