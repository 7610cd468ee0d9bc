//! The cluster harness for integration tests: a PKI minted with `spike pki`, real `spike`
//! processes on 127.0.0.1 ports, and clients built from the crate's own TLS code.
//!
//! Every wait is a bounded poll that fails the test with the process logs when it runs out.
#![allow(dead_code)]

pub mod postgres;
pub mod s3;

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper::{StatusCode, Uri};
use rustls::pki_types::pem::PemObject;
use spike::identity::{self, ExpectedPeer, Role, SvidPaths, SvidSource};
use spike::transport::{HttpsClient, Reply, Timeouts};

pub const TD: &str = "spike.ist";

/// The `spike` binary under test.
pub fn spike_bin() -> &'static str {
    env!("CARGO_BIN_EXE_spike")
}

/// Runs `spike ARGS` to completion and returns (status code, stdout, stderr).
pub fn run_spike(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(spike_bin())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("spawn spike");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A trust domain's CA and the SVIDs minted from it, under one temporary directory.
pub struct Pki {
    pub root: PathBuf,
    pub ca_dir: PathBuf,
    pub trust_domain: String,
}

impl Pki {
    pub fn new(root: &Path, trust_domain: &str) -> Pki {
        let ca_dir = root.join(format!("ca-{trust_domain}"));
        let (code, _, err) = run_spike(
            &[
                "pki",
                "init",
                ca_dir.to_str().unwrap(),
                "--trust-domain",
                trust_domain,
            ],
            &[],
        );
        assert_eq!(code, 0, "pki init failed: {err}");
        Pki {
            root: root.to_path_buf(),
            ca_dir,
            trust_domain: trust_domain.to_string(),
        }
    }

    /// Issues an SVID for `spiffe://<td><path>` into `root/<name>` and returns that directory.
    pub fn issue(&self, name: &str, path: &str) -> PathBuf {
        let out = self.root.join(name);
        let id = format!("spiffe://{}{}", self.trust_domain, path);
        let (code, _, err) = run_spike(
            &[
                "pki",
                "issue",
                self.ca_dir.to_str().unwrap(),
                "--spiffe-id",
                &id,
                "--out",
                out.to_str().unwrap(),
                "--dns",
                "localhost",
                "--ip",
                "127.0.0.1",
            ],
            &[],
        );
        assert_eq!(code, 0, "pki issue failed: {err}");
        out
    }

    pub fn ca_pem(&self) -> PathBuf {
        self.ca_dir.join("ca.pem")
    }
}

/// A running `spike` server process; killed on drop.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
    pub addr: SocketAddr,
    args: Vec<String>,
    env: HashMap<String, String>,
}

impl Proc {
    /// Starts `spike ARGS` with `env` and waits until it logs the address it listens on.
    pub fn start(name: &str, dir: &Path, args: &[&str], env: HashMap<String, String>) -> Proc {
        let mut proc = Proc {
            name: name.to_string(),
            child: None,
            log: dir.join(format!("{name}.log")),
            addr: "127.0.0.1:0".parse().unwrap(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env,
        };
        proc.spawn();
        proc
    }

    fn spawn(&mut self) {
        // Append, so a restarted process's log follows the earlier one.
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let offset = log.metadata().unwrap().len() as usize;
        let child = Command::new(spike_bin())
            .args(&self.args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("NO_COLOR", "1")
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn spike");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = fs::read_to_string(&self.log).unwrap_or_default();
            let text = text.get(offset..).unwrap_or("");
            if let Some(addr) = text
                .split("listening on ")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| c == ';' || c.is_whitespace()).next())
                .and_then(|a| a.parse().ok())
            {
                self.addr = addr;
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "{} exited with {status} before listening:\n{text}",
                    self.name
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not start listening:\n{text}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> Uri {
        format!("https://{}", self.addr).parse().unwrap()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts the same command on the same address (listener sockets use SO_REUSEADDR).
    pub fn restart(&mut self) {
        self.kill();
        let addr = self.addr.to_string();
        for key in ["SPIKE_KEEPER_TLS_PORT", "SPIKE_NEXUS_TLS_PORT"] {
            if self.env.contains_key(key) {
                self.env.insert(key.to_string(), addr.clone());
            }
        }
        self.spawn();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits (bounded) for the process to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sets an environment variable for the next (re)start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.insert(key.to_string(), value.to_string());
    }

    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Environment for a server process with its SVID directory.
pub fn server_env(svid_dir: &Path, extra: &[(&str, &str)]) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = HashMap::new();
    env.insert("SPIKE_SVID_DIR".into(), svid_dir.display().to_string());
    env.insert("SPIKE_TRUST_ROOT".into(), TD.into());
    env.insert("SPIKE_SYSTEM_LOG_LEVEL".into(), "debug".into());
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    env
}

/// A client presenting the SVID in `svid_dir` (or none), expecting the server to have `role`.
pub fn client(svid_dir: Option<&Path>, pki: &Pki, role: Role) -> HttpsClient {
    client_with_timeouts(
        svid_dir,
        pki,
        role,
        Timeouts {
            connect: Duration::from_secs(3),
            handshake: Duration::from_secs(3),
            request: Duration::from_secs(10),
            max_response: 1 << 20,
        },
    )
}

/// [`client`] with other timeouts.
pub fn client_with_timeouts(
    svid_dir: Option<&Path>,
    pki: &Pki,
    role: Role,
    timeouts: Timeouts,
) -> HttpsClient {
    let source = svid_dir.map(|dir| {
        SvidSource::load(SvidPaths::resolve(Some(dir.to_path_buf()), None, None, None).unwrap())
            .unwrap()
    });
    let ca = fs::read(pki.ca_pem()).unwrap();
    let roots: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(&ca)
        .map(|c| c.unwrap())
        .collect();
    let tls = identity::client_config(
        source.as_ref(),
        Some(roots),
        &pki.trust_domain,
        ExpectedPeer::Role(role),
    )
    .unwrap();
    HttpsClient::new(tls, timeouts)
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET /health` without a client certificate: (status, parsed body).
pub async fn health(client: &HttpsClient, url: &Uri) -> Option<(StatusCode, serde_json::Value)> {
    let reply: Reply = client.get(url, "/health").await.ok()?;
    Some((reply.status, serde_json::from_slice(&reply.body).ok()?))
}

/// Waits until `/health` reports `status`, and returns the body.
pub async fn wait_status(client: &HttpsClient, url: &Uri, status: &str) -> serde_json::Value {
    wait_for(
        &format!("{url} to report {status}"),
        Duration::from_secs(30),
        || async {
            match health(client, url).await {
                Some((_, body)) if body["status"] == status => Some(body),
                _ => None,
            }
        },
    )
    .await
}

/// A temporary directory, a PKI for [`TD`], and Keepers; Nexus instances are added by tests.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub keepers: Vec<Proc>,
    pub nexus: Vec<Proc>,
    /// The SVID directory shared by every Nexus instance.
    pub nexus_svid: PathBuf,
    /// SQLite data directory shared by every Nexus instance.
    pub data_dir: PathBuf,
}

impl Cluster {
    /// A PKI and `keepers` running Keepers.
    pub fn new(keepers: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path(), TD);
        let nexus_svid = pki.issue("nexus", "/spike/nexus");
        let keepers = (1..=keepers)
            .map(|i| {
                let svid = pki.issue(&format!("keeper-{i}"), &format!("/spike/keeper/{i}"));
                Proc::start(
                    &format!("keeper-{i}"),
                    dir.path(),
                    &["keeper"],
                    server_env(&svid, &[("SPIKE_KEEPER_TLS_PORT", "127.0.0.1:0")]),
                )
            })
            .collect();
        let data_dir = dir.path().join("data");
        Cluster {
            dir,
            pki,
            keepers,
            nexus: Vec::new(),
            nexus_svid,
            data_dir,
        }
    }

    /// `SPIKE_NEXUS_KEEPER_PEERS` for the running Keepers.
    pub fn peers(&self) -> String {
        self.keepers
            .iter()
            .map(|k| k.url().to_string().trim_end_matches('/').to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Environment for a Nexus on this cluster's Keepers and SQLite directory.
    pub fn nexus_env(&self, extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut env = server_env(
            &self.nexus_svid,
            &[
                ("SPIKE_NEXUS_TLS_PORT", "127.0.0.1:0"),
                ("SPIKE_NEXUS_KEEPER_PEERS", &self.peers()),
                ("SPIKE_NEXUS_SHAMIR_SHARES", &self.keepers.len().to_string()),
                ("SPIKE_NEXUS_DATA_DIR", self.data_dir.to_str().unwrap()),
                ("SPIKE_NEXUS_RECOVERY_MAX_INTERVAL", "500ms"),
                ("SPIKE_NEXUS_KEEPER_TIMEOUT", "2s"),
            ],
        );
        for (k, v) in extra {
            env.insert(k.to_string(), v.to_string());
        }
        env
    }

    /// Starts a Nexus and returns its index in `self.nexus`.
    pub fn start_nexus(&mut self, extra: &[(&str, &str)]) -> usize {
        let name = format!("nexus-{}", self.nexus.len() + 1);
        let env = self.nexus_env(extra);
        let proc = Proc::start(&name, self.dir.path(), &["nexus"], env);
        self.nexus.push(proc);
        self.nexus.len() - 1
    }

    /// A client of Nexus's API with a new SVID for `spiffe_path` in this cluster's trust domain.
    pub fn api_client(&self, name: &str, spiffe_path: &str) -> HttpsClient {
        client(
            Some(&self.pki.issue(name, spiffe_path)),
            &self.pki,
            Role::Nexus,
        )
    }

    /// A client with no certificate, for `/health`.
    pub fn anonymous(&self) -> HttpsClient {
        client(None, &self.pki, Role::Nexus)
    }

    /// A client acting as Nexus towards the Keepers (the test inspects and plants shards).
    pub fn as_nexus_to_keepers(&self) -> HttpsClient {
        client(Some(&self.nexus_svid), &self.pki, Role::Keeper)
    }

    /// The shard a Keeper holds: `Some((index, value))`, or `None` when it is empty.
    pub async fn keeper_shard(&self, i: usize) -> Option<(Option<u8>, [u8; 32])> {
        let reply = self
            .as_nexus_to_keepers()
            .post_json(&self.keepers[i].url(), "/v1/store/shard", b"{}".to_vec())
            .await
            .expect("keeper answers");
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        if reply.status != StatusCode::OK {
            assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
            assert!(body["shard"].is_null(), "{body}");
            return None;
        }
        let shard: [u8; 32] = serde_json::from_value(body["shard"].clone()).unwrap();
        Some((body["id"].as_u64().map(|i| i as u8), shard))
    }

    /// Dumps every process log; call before a failing assertion for context.
    pub fn dump_logs(&self) -> String {
        self.keepers
            .iter()
            .chain(self.nexus.iter())
            .map(|p| format!("===== {} =====\n{}", p.name, p.logs()))
            .collect()
    }
}

/// POSTs `body` as JSON and returns the status and the parsed answer (`Null` if not JSON).
/// No answer at all (refused, reset) is reported as 502 with `client_error`, so outage tests
/// can count it and other tests fail on the status.
pub async fn call(
    client: &HttpsClient,
    url: &Uri,
    path: &str,
    body: serde_json::Value,
) -> (StatusCode, serde_json::Value) {
    match client
        .post_json(url, path, serde_json::to_vec(&body).unwrap())
        .await
    {
        Ok(reply) => (
            reply.status,
            serde_json::from_slice(&reply.body).unwrap_or(serde_json::Value::Null),
        ),
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            serde_json::json!({ "client_error": e.to_string() }),
        ),
    }
}

/// Borrowed `(name, value)` pairs from owned ones, for `Cluster::start_nexus`.
pub fn pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}
