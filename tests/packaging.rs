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
    let hardening = [
        "MemorySwapMax=0",
        "LimitCORE=0",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "CapabilityBoundingSet=",
        "User=spike",
    ];
    for unit in [
        "spike-nexus.service",
        "spike-keeper.service",
        "spike-backup.service",
        "spike-backup.timer",
    ] {
        let text = std::fs::read_to_string(format!("{root}/systemd/{unit}")).unwrap();
        let keys: Vec<&str> = match unit {
            "spike-backup.timer" => vec!["OnCalendar=hourly", "Persistent=true"],
            "spike-backup.service" => [&["Type=oneshot"][..], &hardening].concat(),
            _ => [
                &["Type=notify", "Restart=always", "WatchdogSec=30"][..],
                &hardening,
            ]
            .concat(),
        };
        for key in keys {
            assert!(text.lines().any(|l| l == key), "{unit} lacks {key}");
        }
        if unit.ends_with(".service") {
            assert!(text.contains("ExecStart=/usr/bin/spike "), "{unit}");
            assert!(text.contains("EnvironmentFile=/etc/spike/"), "{unit}");
        }
        let path = dir.path().join(unit);
        std::fs::write(&path, text.replace("/usr/bin/spike", common::spike_bin())).unwrap();
        units.push(path);
    }
    // spike backup asks the Keepers for the root key with Nexus's identity: whatever of
    // Nexus's sandbox decides what files, sockets and networks it reaches is the backup's too.
    let nexus = std::fs::read_to_string(format!("{root}/systemd/spike-nexus.service")).unwrap();
    let backup = std::fs::read_to_string(format!("{root}/systemd/spike-backup.service")).unwrap();
    let reach = [
        "EnvironmentFile=",
        "User=",
        "Group=",
        "ReadOnlyPaths=",
        "ReadWritePaths=",
        "InaccessiblePaths=",
        "BindReadOnlyPaths=",
        "ProtectSystem=",
        "ProtectHome=",
        "PrivateTmp=",
        "PrivateNetwork=",
        "IPAddress",
        "RestrictAddressFamilies=",
        "SystemCallFilter=",
        "RestrictFileSystems=",
        "SocketBindDeny=",
    ];
    let lines = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| reach.iter().any(|k| l.starts_with(k)))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        lines(&backup),
        lines(&nexus),
        "spike-backup.service reaches less than Nexus"
    );
    assert!(backup.contains("After=network-online.target spike-nexus.service"));
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

/// `packaging/deb/build.sh` makes a well-formed .deb from the binary under test. It is built and
/// inspected only; never installed here.
#[test]
fn deb_package_builds_with_expected_contents() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = tempfile::tempdir().unwrap();
    assert!(
        Command::new("dpkg-deb").arg("--version").output().is_ok(),
        "dpkg-deb is needed to build the .deb (Debian package dpkg)"
    );
    let build = Command::new(format!("{root}/packaging/deb/build.sh"))
        .arg(common::spike_bin())
        .arg(out.path())
        // The debug binary is large; compressing it is slow and tests nothing.
        .env("SPIKE_DEB_COMPRESSION", "none")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&build.stderr);
    assert!(build.status.success(), "build.sh failed:\n{stderr}");
    // dpkg-deb itself complains about nothing (our own note about a dynamic binary is fine).
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("dpkg-deb: warning") || l.starts_with("dpkg-deb: error"))
        .collect();
    assert!(complaints.is_empty(), "dpkg-deb: {complaints:?}");

    let version = env!("CARGO_PKG_VERSION");
    let deb = out.path().join(format!("spike_{version}_amd64.deb"));
    assert_eq!(
        String::from_utf8(build.stdout).unwrap().trim_end(),
        deb.to_str().unwrap()
    );
    let dpkg = |args: &[&str]| {
        let o = Command::new("dpkg-deb")
            .args(args)
            .arg(&deb)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(
            o.status.success() && err.is_empty(),
            "dpkg-deb {args:?}: {err}"
        );
        String::from_utf8(o.stdout).unwrap()
    };

    let info = dpkg(&["--info"]);
    for field in [
        "Package: spike".to_string(),
        format!("Version: {version}"),
        "Architecture: amd64".into(),
        "Section: admin".into(),
    ] {
        assert!(info.lines().any(|l| l.trim() == field), "{field}\n{info}");
    }
    let depends = info
        .lines()
        .find(|l| l.trim().starts_with("Depends:"))
        .unwrap();
    assert!(depends.contains("adduser"), "{depends}");
    for script in ["postinst", "prerm", "postrm", "conffiles", "control"] {
        assert!(info.contains(&format!(" {script}")), "no {script}\n{info}");
    }

    // `dpkg-deb -c` lines: mode owner/group size date time ./path
    let contents = dpkg(&["--contents"]);
    let entries: Vec<(&str, &str, &str)> = contents
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0], f[1], f[5].trim_start_matches('.'))
        })
        .collect();
    let entry = |path: &str| {
        entries
            .iter()
            .find(|e| e.2 == path)
            .unwrap_or_else(|| panic!("{path} not in the package:\n{contents}"))
    };
    assert!(entries.iter().all(|e| e.1 == "root/root"), "{contents}");
    assert_eq!(entry("/usr/bin/spike").0, "-rwxr-xr-x");
    assert_eq!(entry("/etc/spike/nexus.env").0, "-rw-r-----");
    assert_eq!(entry("/etc/spike/keeper.env").0, "-rw-r-----");
    for path in [
        "/lib/systemd/system/spike-nexus.service",
        "/lib/systemd/system/spike-keeper.service",
        "/lib/systemd/system/spike-backup.service",
        "/lib/systemd/system/spike-backup.timer",
        "/usr/share/man/man1/spike.1.gz",
        "/usr/share/man/man1/spike-nexus.1.gz",
        "/usr/share/man/man1/spike-secret-put.1.gz",
        "/usr/share/bash-completion/completions/spike",
        "/usr/share/zsh/vendor-completions/_spike",
        "/usr/share/fish/vendor_completions.d/spike.fish",
        "/usr/share/doc/spike/copyright",
        "/usr/share/doc/spike/changelog.gz",
        "/usr/share/lintian/overrides/spike",
        "/usr/share/doc/spike/examples/haproxy/spike-nexus.cfg",
        "/usr/share/doc/spike/examples/nginx/spike-nexus.conf",
        "/etc/logrotate.d/spike-nexus",
    ] {
        assert_eq!(entry(path).0, "-rw-r--r--", "{path}");
    }
    let man_pages = entries
        .iter()
        .filter(|e| e.2.starts_with("/usr/share/man/man1/") && e.2.ends_with(".1.gz"))
        .count();
    let committed = std::fs::read_dir(format!("{root}/man")).unwrap().count();
    assert_eq!(man_pages, committed, "one man page per committed man/*.1");

    // Control files: the env files are conffiles, the scripts are valid sh.
    let control = tempfile::tempdir().unwrap();
    let o = Command::new("dpkg-deb")
        .arg("--control")
        .arg(&deb)
        .arg(control.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let conffiles = std::fs::read_to_string(control.path().join("conffiles")).unwrap();
    assert_eq!(
        conffiles,
        "/etc/spike/nexus.env\n/etc/spike/keeper.env\n/etc/logrotate.d/spike-nexus\n"
    );
    for script in ["postinst", "prerm", "postrm"] {
        let path = control.path().join(script);
        let o = Command::new("sh").arg("-n").arg(&path).output().unwrap();
        assert!(
            o.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let postinst = std::fs::read_to_string(control.path().join("postinst")).unwrap();
    assert!(postinst.contains("adduser --system"), "{postinst}");
    assert!(postinst.contains("install -d -m 0700 -o spike -g spike /var/lib/spike"));
}
