#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! What ships besides the binary: systemd units that `systemd-analyze verify` accepts, man
//! pages and completions generated from the clap definitions, and the .deb that carries them.

mod common;
#[allow(dead_code)] // its main() is the example's entry point, unused here
#[path = "../examples/manpages.rs"]
mod manpages;

use std::process::Command;

/// `systemd-analyze verify` accepts the units with no warning (unknown keys, bad values), with
/// ExecStart pointed at the binary under test.
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

/// The committed `man/` is what the clap definitions generate today, byte for byte.
#[test]
fn committed_man_pages_are_up_to_date() {
    let dir = tempfile::tempdir().unwrap();
    manpages::man_pages(dir.path()).unwrap();
    let committed = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("man");
    let names = |d: &std::path::Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name().into_string().unwrap())
                    .filter(|n| n.ends_with(".1"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let generated = names(dir.path());
    for page in [
        "spike.1",
        "spike-nexus.1",
        "spike-secret-put.1",
        "spike-completions.1",
    ] {
        assert!(generated.iter().any(|n| n == page), "{page} not generated");
    }
    assert!(
        !generated.iter().any(|n| n.contains("help")),
        "{generated:?}"
    );
    let regenerate = "the man pages are stale: regenerate them with \
                      `cargo run --locked --example manpages -- man` and commit man/";
    assert_eq!(names(&committed), generated, "{regenerate}");
    for page in &generated {
        let want = std::fs::read(dir.path().join(page)).unwrap();
        let have = std::fs::read(committed.join(page)).unwrap();
        assert!(want == have, "man/{page} differs; {regenerate}");
    }
}

#[test]
fn completions_for_every_shell() {
    for (shell, marker) in [
        ("bash", "complete -F _spike"),
        ("zsh", "#compdef spike"),
        ("fish", "complete -c spike"),
        ("elvish", "edit:completion:arg-completer[spike]"),
        ("powershell", "Register-ArgumentCompleter"),
    ] {
        let (code, stdout, stderr) = common::run_spike(&["completions", shell], &[]);
        assert_eq!(code, 0, "{shell}: {stderr}");
        assert!(stdout.contains(marker), "{shell} script lacks {marker:?}");
        assert!(
            stdout.contains("secret"),
            "{shell} script lacks subcommands"
        );
    }
    let (code, _, stderr) = common::run_spike(&["completions", "tcsh"], &[]);
    assert_eq!(code, 2, "{stderr}");
}
