#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! `spike dev`: the real binary starts the whole system, prints the ready line, answers
//! `/health` with only the CA, stops cleanly on SIGTERM, and comes back with the same root key
//! on the same directory — also from the on-disk states a kill can leave between making the
//! key and saving its shards (issue 13.9).

mod common;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Process, Stdout};
use hyper::{StatusCode, Uri};
use spike::crypto::RootKey;
use spike::identity::Role;
use spike::store::Store;
use spike::store::sqlite::SqliteStore;

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

    /// Waits (≤ 30 s) until stderr contains `needle`, and returns stderr.
    fn wait_stderr(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let err = self.stderr();
            if err.contains(needle) {
                return err;
            }
            if let Some(status) = self.0.exited() {
                panic!("spike dev exited with {status} before saying {needle:?}:\n{err}");
            }
            assert!(
                Instant::now() < deadline,
                "spike dev did not say {needle:?} in 30 s:\n{}\n{err}",
                self.stdout()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
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
    // The shards file was written before the key reached the store: spike dev made the key,
    // and Nexus adopted it from the Keepers and only then wrote its verifier.
    let err = dev.stderr();
    let made = err.find("made a new dev root key and saved its shards");
    let adopted = err.find("adopted the Keepers' root key and recorded its verifier");
    assert!(
        made.is_some() && adopted.is_some() && made < adopted,
        "{err}"
    );

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

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// The verifier's key id in the SQLite store under `data`, if any.
fn stored_key_id(data: &Path) -> Option<String> {
    block_on(async {
        let store = SqliteStore::open(data).await.unwrap();
        store.verifier().await.unwrap().map(|v| v.key_id)
    })
}

/// Runs the `spike` CLI against a dev directory as one of its operator identities.
fn cli(dir: &Path, port: u16, who: &str, args: &[&str]) -> (i32, String, String) {
    let url = format!("https://127.0.0.1:{port}");
    let svid = dir.join(who);
    common::run_spike(
        args,
        &[
            ("SPIKE_NEXUS_API_URL", url.as_str()),
            ("SPIKE_SVID_DIR", svid.to_str().unwrap()),
        ],
    )
}

/// Issue 13.9, the state an older `spike dev` left when killed after Nexus wrote the key's
/// verifier and before the shards file was saved: a store with a verifier, no shards file, no
/// secret. It used to wait for a restore forever; now the store is moved aside (not deleted)
/// and a new deployment starts, and restarts keep that new key.
#[test]
fn a_verifier_without_shards_file_and_no_data_is_set_aside_and_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let orphan = RootKey::generate().unwrap();
    block_on(async {
        let store = SqliteStore::open(&dir.join("data")).await.unwrap();
        assert!(
            store
                .create_verifier(&orphan.make_verifier().unwrap())
                .await
                .unwrap()
        );
    });
    assert!(!dir.join(spike::entry::dev::SHARDS_FILE).exists());
    let ports = free_ports(4);
    let mut dev = Dev::start(&dir, ports[0], &ports[1..], &[]);
    let key_id = dev.wait_ready();
    assert_ne!(key_id, orphan.key_id());
    let err = dev.stderr();
    assert!(err.contains("moved it to"), "{err}");
    let aside: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("data.orphaned-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(stored_key_id(&aside[0]), Some(orphan.key_id()));
    assert!(dir.join(spike::entry::dev::SHARDS_FILE).exists());
    dev.stop();
    let mut again = Dev::start(&dir, ports[0], &ports[1..], &[]);
    assert_eq!(again.wait_ready(), key_id, "{}", again.stderr());
    again.stop();
}

/// The state the new order can leave when killed after saving the shards file and before
/// Nexus wrote the verifier: a shards file and a store without verifier. The next start
/// preloads the file and Nexus adopts that key.
#[test]
fn a_shards_file_saved_before_the_verifier_is_adopted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let key = RootKey::generate().unwrap();
    let shares = spike::crypto::split(&key, 2, 3).unwrap();
    assert_eq!(stored_key_id(&dir.join("data")), None);
    let file = dir.join(spike::entry::dev::SHARDS_FILE);
    let text: String = shares[..2]
        .iter()
        .map(|s| format!("{}\n", *spike::crypto::encode_recovery_shard(s)))
        .collect();
    std::fs::write(&file, text).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ports = free_ports(4);
    let mut dev = Dev::start(&dir, ports[0], &ports[1..], &[]);
    assert_eq!(dev.wait_ready(), key.key_id(), "{}", dev.stderr());
    dev.stop();
    assert_eq!(stored_key_id(&dir.join("data")), Some(key.key_id()));
}

/// A store with a key and a secret but no shards file (deleted, or an older spike dev killed
/// after a secret was written): nothing is moved or deleted; spike dev says how to get out
/// (restore, or remove the data directory) and waits; a restore with recovery shards brings
/// the same key and the secret back, and the shards file is saved again.
#[test]
fn a_lost_shards_file_with_data_changes_nothing_and_a_restore_brings_it_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let ports = free_ports(4);
    let mut dev = Dev::start(&dir, ports[0], &ports[1..], &[]);
    let key_id = dev.wait_ready();
    let (code, _, err) = cli(
        &dir,
        ports[0],
        "superuser",
        &["secret", "put", "keep/me", "v=1"],
    );
    assert_eq!(code, 0, "{err}");
    let rec = tmp.path().join("recovery");
    let (code, _, err) = cli(
        &dir,
        ports[0],
        "recover",
        &["recover", "export", rec.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{err}");
    dev.stop();
    std::fs::remove_file(dir.join(spike::entry::dev::SHARDS_FILE)).unwrap();

    let mut dev = Dev::start(&dir, ports[0], &ports[1..], &[]);
    let err = dev.wait_stderr("Nothing was changed");
    for expected in [
        "spike recover restore".to_string(),
        format!("remove {}", dir.join("data").display()),
    ] {
        assert!(err.contains(&expected), "missing {expected:?} in:\n{err}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while health(&dir, ports[0]).1["status"] != "awaiting_restore" {
        assert!(Instant::now() < deadline, "{}", dev.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(stored_key_id(&dir.join("data")), Some(key_id.clone()));
    assert!(std::fs::read_dir(&dir).unwrap().all(|e| {
        !e.unwrap()
            .file_name()
            .to_str()
            .unwrap()
            .contains("orphaned")
    }),);

    for i in [1, 3] {
        let file = rec.join(format!("spike.recovery.{i}.txt"));
        let (code, _, err) = cli(
            &dir,
            ports[0],
            "restore",
            &[
                "recover",
                "restore",
                "--nexus",
                &format!("https://127.0.0.1:{}", ports[0]),
                file.to_str().unwrap(),
            ],
        );
        assert_eq!(code, 0, "{err}");
    }
    assert_eq!(dev.wait_ready(), key_id, "{}", dev.stderr());
    let (code, out, err) = cli(
        &dir,
        ports[0],
        "superuser",
        &["secret", "get", "keep/me", "v"],
    );
    assert_eq!((code, out.trim()), (0, "1"), "{err}");
    // The shards file is back, so the next start needs no restore.
    let saved = dir.join(spike::entry::dev::SHARDS_FILE);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !saved.exists() {
        assert!(Instant::now() < deadline, "{}", dev.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    dev.stop();
    let mut again = Dev::start(&dir, ports[0], &ports[1..], &[]);
    assert_eq!(again.wait_ready(), key_id, "{}", again.stderr());
    again.stop();
}
