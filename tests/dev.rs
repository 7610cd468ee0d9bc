#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! `spike dev`: the real binary starts the whole system, prints the ready line, answers
//! `/health` with only the CA, stops cleanly on SIGTERM, and comes back with the same root key
//! on the same directory.

mod common;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Process, Stdout};
use hyper::{StatusCode, Uri};
use spike::identity::Role;

/// `n` distinct ports that were free a moment ago (`spike dev` takes its ports as arguments).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A running `spike dev`: its stdout collected line by line, stderr in a log file.
struct Dev(Process);

impl Dev {
    fn start(dir: &Path, nexus_port: u16, keeper_ports: &[u16], extra: &[&str]) -> Dev {
        let ports = keeper_ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let nexus_port = nexus_port.to_string();
        let mut args = vec!["dev", "--dir", dir.to_str().unwrap()];
        args.extend(["--nexus-port", &nexus_port, "--keeper-ports", &ports]);
        args.extend(extra);
        let mut cmd = common::spike_command(&args, &[("SPIKE_SYSTEM_LOG_LEVEL", "info")]);
        let name = format!("dev-{nexus_port}");
        Dev(Process::spawn(
            &name,
            dir.parent().unwrap(),
            &mut cmd,
            Stdout::Capture,
        ))
    }

    fn stdout(&self) -> String {
        self.0.stdout()
    }

    fn stderr(&self) -> String {
        self.0.logs()
    }

    /// Waits (≤ 30 s) for the ready line and returns the key id it names.
    fn wait_ready(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.stdout();
            if let Some(rest) = out
                .lines()
                .find_map(|l| l.strip_prefix("spike dev: ready (root key "))
            {
                return rest.split(',').next().unwrap().to_string();
            }
            if let Some(status) = self.0.exited() {
                panic!(
                    "spike dev exited with {status} before ready:\n{}\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "spike dev not ready in 30 s:\n{out}\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (≤ 30 s) for the process to exit and returns its status code; by then its whole
    /// stdout has been read.
    fn wait_exit(&mut self) -> i32 {
        self.0
            .wait_exit(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("spike dev did not exit in 30 s:\n{}", self.stderr()))
    }

    /// SIGTERM, then checks a clean exit that printed "stopped".
    fn stop(&mut self) {
        self.0.signal("TERM");
        let code = self.wait_exit();
        assert_eq!(code, 0, "{}\n{}", self.stdout(), self.stderr());
        assert!(
            self.stdout().lines().any(|l| l == "spike dev: stopped"),
            "{}",
            self.stdout()
        );
    }
}

/// `GET /health` on the dev Nexus with only the dev CA: (status, body).
fn health(dir: &Path, port: u16) -> (StatusCode, serde_json::Value) {
    let pki = common::Pki {
        root: dir.to_path_buf(),
        ca_dir: dir.join("ca"),
        trust_domain: common::TD.to_string(),
    };
    let client = common::client(None, &pki, Role::Nexus);
    let url: Uri = format!("https://127.0.0.1:{port}").parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(common::health(&client, &url))
        .expect("health answers")
}

#[test]
fn dev_runs_stops_cleanly_and_restarts_with_the_same_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let ports = free_ports(4);
    let mut dev = Dev::start(&dir, ports[0], &ports[1..], &[]);
    let key_id = dev.wait_ready();
    let out = dev.stdout();
    for expected in [
        format!("export SPIKE_NEXUS_API_URL=https://127.0.0.1:{}", ports[0]),
        format!("export SPIKE_SVID_DIR={}/superuser", dir.display()),
        "export SPIKE_TRUST_ROOT=spike.ist".to_string(),
        "spike secret put secrets/db/creds".to_string(),
    ] {
        assert!(out.contains(&expected), "missing {expected:?} in:\n{out}");
    }
    assert!(
        out.contains(&format!("sqlite at {}/data/spike.db", dir.display())),
        "{out}"
    );
    assert!(
        dev.stderr().contains("not for production"),
        "{}",
        dev.stderr()
    );

    let (status, body) = health(&dir, ports[0]);
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ready");
    assert_eq!(body["key_id"], key_id.as_str());

    // Every identity was minted; the shards file is private and in SPIKE's recovery format.
    for name in [
        "nexus",
        "keeper-1",
        "keeper-2",
        "keeper-3",
        "superuser",
        "recover",
        "restore",
    ] {
        assert!(dir.join(name).join("svid.pem").exists(), "{name}");
    }
    let shards = dir.join(spike::entry::dev::SHARDS_FILE);
    let mode = std::fs::metadata(&shards).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&shards).unwrap();
    assert_eq!(text.lines().count(), 2);
    for line in text.lines() {
        spike::crypto::decode_recovery_shard(line).unwrap();
    }
    dev.stop();

    // Same directory: same CA, same store, same root key.
    let ca_before = std::fs::read(dir.join("ca/ca.pem")).unwrap();
    let mut again = Dev::start(&dir, ports[0], &ports[1..], &[]);
    assert_eq!(again.wait_ready(), key_id, "{}", again.stderr());
    assert_eq!(std::fs::read(dir.join("ca/ca.pem")).unwrap(), ca_before);
    let (status, body) = health(&dir, ports[0]);
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["key_id"], key_id.as_str());
    again.stop();
}

#[test]
fn ephemeral_dev_writes_no_shards_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let ports = free_ports(4);
    let mut dev = Dev::start(&dir, ports[0], &ports[1..], &["--ephemeral"]);
    dev.wait_ready();
    assert!(dev.stdout().contains("memory store"), "{}", dev.stdout());
    let (status, body) = health(&dir, ports[0]);
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["backend"], "memory");
    dev.stop();
    assert!(!dir.join(spike::entry::dev::SHARDS_FILE).exists());
    assert!(!dir.join("data").join("spike.db").exists());
}

#[test]
fn a_port_in_use_stops_everything_with_exit_1_and_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let ports = free_ports(3);
    let mut dev = Dev::start(&dir, ports[0], &[ports[1], busy_port, ports[2]], &[]);
    assert_eq!(dev.wait_exit(), 1, "{}", dev.stderr());
    let err = dev.stderr();
    let reasons: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("spike dev: ") && l.contains("cannot listen"))
        .collect();
    assert_eq!(reasons.len(), 1, "{err}");
    assert!(
        reasons[0].contains(&format!("127.0.0.1:{busy_port}")),
        "{}",
        reasons[0]
    );
    assert!(!dev.stdout().contains("ready"), "{}", dev.stdout());
    drop(busy);
}

#[test]
fn wrong_keeper_port_count_is_a_usage_error() {
    let (code, _, err) = common::run_spike(&["dev", "--keeper-ports", "1,2"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("exactly 3 ports"), "{err}");
}
