//! The cluster harness for integration tests: a PKI minted with `spike pki`, real `spike`
//! processes on 127.0.0.1 ports, in-process servers on listeners the test bound, and clients
//! built from the crate's own TLS code.
//!
//! Every wait is a bounded poll that fails the test with the process logs when it runs out.
//!
//! # How a test learns a server's address
//!
//! - In-process ([`InProcess`]): the test binds `127.0.0.1:0` itself and hands the listener to
//!   `spike::nexus::run_on` / `spike::keeper::run_on` (mini-redis's `run(listener, shutdown)`),
//!   so the address is known before the server starts and nothing is read back from logs.
//!   Tests of the server loop (idle and slow connections, the connection cap) run this way:
//!   they can also be broken and checked in-process.
//! - Processes ([`Proc`]): `spike nexus` / `spike keeper` are started with port 0 and the test
//!   reads the `listening on ADDR` line of the process's log. Handing a pre-bound socket to a
//!   child the way systemd does (`LISTEN_FDS`) needs the socket at fd 3 and `LISTEN_PID` set to
//!   the child's own pid, which only a `pre_exec` hook between fork and exec can do; that hook
//!   is `unsafe`, which this crate forbids. Binding a port in the test, closing it and passing
//!   the number races with every other test. So process tests keep reading the log line, whose
//!   format is fixed by `nexus::run` and `keeper::run`.
// Each test binary uses a part of the harness and of what it re-exports.
#![allow(dead_code, unused_imports)]

pub mod postgres;
pub mod process;
pub mod s3;
pub mod spire;

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::{StatusCode, Uri};
pub use process::{Frozen, Process, Stdout, signal, with_children};
use rustls::pki_types::pem::PemObject;
use spike::identity::{self, ExpectedPeer, Role, SvidPaths, SvidSource};
pub use spike::protocol::keeper::{CONTRIBUTE_PATH, SHARD_PATH};
pub use spike::protocol::nexus::{
    DECRYPT_PATH, ENCRYPT_PATH, HEALTH_PATH, POLICY_PATH, RECOVER_PATH, RESTORE_PATH,
    SECRET_METADATA_PATH, SECRETS_PATH,
};
use spike::transport::{HttpsClient, Reply, Timeouts};

pub const TD: &str = "spike.ist";

/// `path?action=verb`: a route of [`spike::protocol::nexus`] with its action, as the client
/// sends it.
pub fn action(path: &str, verb: &str) -> String {
    format!("{path}?action={verb}")
}

/// The `spike` binary under test.
pub fn spike_bin() -> &'static str {
    env!("CARGO_BIN_EXE_spike")
}

/// `spike ARGS` with only `PATH`, `NO_COLOR` and `env` in its environment.
pub fn spike_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(spike_bin());
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NO_COLOR", "1")
        .envs(env.iter().copied());
    cmd
}

/// Runs `spike ARGS` to completion and returns (status code, stdout, stderr).
pub fn run_spike(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = process::output_within(&mut spike_command(args, env), process::COMMAND_LIMIT);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `spike ARGS` with `stdin` as its input; returns (status code, stdout bytes, stderr).
pub fn run_spike_with_stdin(
    args: &[&str],
    env: &[(&str, &str)],
    stdin: &[u8],
) -> (i32, Vec<u8>, String) {
    use std::io::Write;
    let mut child = spike_command(args, env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn spike");
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    // Written from a thread: a child that answers before reading everything must not block us.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let out = child.wait_with_output().expect("wait for spike");
    writer.join().unwrap();
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A local port nothing listens on (it was free a moment ago): for URLs that must not answer.
pub fn unused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
    pub log: PathBuf,
    pub addr: SocketAddr,
    dir: PathBuf,
    process: Option<Process>,
    /// Length of the log when the current process started: its `listening on` line is after.
    offset: usize,
    args: Vec<String>,
    env: HashMap<String, String>,
    /// Runs the process as this SPIRE workload uid (through `setpriv`), when set.
    uid: Option<u32>,
}

impl Proc {
    /// Starts `spike ARGS` with `env` and waits until it logs the address it listens on.
    pub fn start(name: &str, dir: &Path, args: &[&str], env: HashMap<String, String>) -> Proc {
        let mut proc = Proc::launch(name, dir, args, env);
        proc.wait_listening();
        proc
    }

    /// Starts `spike ARGS` with `env` without waiting: [`Proc::wait_listening`] does. Several
    /// processes launched before any is waited for start together.
    pub fn launch(name: &str, dir: &Path, args: &[&str], env: HashMap<String, String>) -> Proc {
        let mut proc = Proc {
            name: name.to_string(),
            log: dir.join(format!("{name}.log")),
            addr: "127.0.0.1:0".parse().unwrap(),
            dir: dir.to_path_buf(),
            process: None,
            offset: 0,
            args: args.iter().map(|s| s.to_string()).collect(),
            env,
            uid: None,
        };
        proc.spawn();
        proc
    }

    /// [`Proc::start`] as the SPIRE workload `uid`: the process takes its identity from the
    /// agent's Workload API (`SPIFFE_ENDPOINT_SOCKET` is in `env`).
    pub fn start_as(
        uid: u32,
        name: &str,
        dir: &Path,
        args: &[&str],
        env: HashMap<String, String>,
    ) -> Proc {
        let mut proc = Proc {
            name: name.to_string(),
            log: dir.join(format!("{name}.log")),
            addr: "127.0.0.1:0".parse().unwrap(),
            dir: dir.to_path_buf(),
            process: None,
            offset: 0,
            args: args.iter().map(|s| s.to_string()).collect(),
            env,
            uid: Some(uid),
        };
        proc.spawn();
        proc.wait_listening();
        proc
    }

    fn spawn(&mut self) {
        // The log is appended to, so a restarted process's log follows the earlier one.
        self.offset = fs::metadata(&self.log).map_or(0, |m| m.len() as usize);
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let mut cmd = match self.uid {
            None => spike_command(&args, &[]),
            Some(uid) => {
                let mut cmd = spire::as_uid(uid, spike_bin());
                cmd.args(&args)
                    .env_clear()
                    .env("PATH", std::env::var("PATH").unwrap_or_default())
                    .env("NO_COLOR", "1");
                cmd
            }
        };
        cmd.envs(&self.env);
        self.process = Some(Process::spawn(&self.name, &self.dir, &mut cmd, Stdout::Log));
    }

    /// Waits (bounded) until the process logs the address it listens on.
    pub fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.logs();
            let text = text.get(self.offset..).unwrap_or("");
            if let Some(addr) = text
                .split("listening on ")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| c == ';' || c.is_whitespace()).next())
                .and_then(|a| a.parse().ok())
            {
                self.addr = addr;
                return;
            }
            if let Some(status) = self.process.as_mut().and_then(Process::exited) {
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

    /// The URL as a client's `SPIKE_NEXUS_API_URL` names it (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
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
        self.wait_listening();
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().expect("running").pid()
    }

    /// Sends `sig` (TERM, STOP, CONT...).
    pub fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    /// Waits (bounded) for the process to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        self.process.as_mut()?.wait_exit(limit)
    }

    /// Sets an environment variable for the next (re)start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.insert(key.to_string(), value.to_string());
    }

    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(Process::is_running)
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

/// The environment of a client command (`spike secret ...`) run as the SVID in `svid` against
/// `url` (one URL or a comma-separated list).
pub fn client_env<'a>(url: &'a str, svid: &'a Path) -> Vec<(&'a str, &'a str)> {
    vec![
        ("SPIKE_NEXUS_API_URL", url),
        ("SPIKE_SVID_DIR", svid.to_str().unwrap()),
        ("SPIKE_TRUST_ROOT", TD),
    ]
}

/// The rustls configuration of a client presenting the SVID in `svid_dir` (or none), trusting
/// `pki`'s CA and expecting the server to have `role`.
pub fn client_tls(svid_dir: Option<&Path>, pki: &Pki, role: Role) -> Arc<rustls::ClientConfig> {
    let source = svid_dir.map(|dir| {
        SvidSource::load(SvidPaths::resolve(Some(dir.to_path_buf()), None, None, None).unwrap())
            .unwrap()
    });
    let ca = fs::read(pki.ca_pem()).unwrap();
    let roots: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(&ca)
        .map(|c| c.unwrap())
        .collect();
    identity::client_config(
        source.as_ref(),
        Some(roots),
        &pki.trust_domain,
        ExpectedPeer::Role(role),
    )
    .unwrap()
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
    HttpsClient::new(client_tls(svid_dir, pki, role), timeouts)
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
        Cluster::with_keeper_env(keepers, &[])
    }

    /// [`Cluster::new`] with `extra` in every Keeper's environment.
    pub fn with_keeper_env(keepers: usize, extra: &[(&str, &str)]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path(), TD);
        let nexus_svid = pki.issue("nexus", "/spike/nexus");
        let keepers = (1..=keepers)
            .map(|i| {
                let svid = pki.issue(&format!("keeper-{i}"), &format!("/spike/keeper/{i}"));
                let mut env = vec![("SPIKE_KEEPER_TLS_PORT", "127.0.0.1:0")];
                env.extend_from_slice(extra);
                Proc::start(
                    &format!("keeper-{i}"),
                    dir.path(),
                    &["keeper"],
                    server_env(&svid, &env),
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

    /// Keepers and the Nexus SVID from a real SPIRE agent (SVID files fetched as each
    /// identity's uid), trusting SPIRE's bundle; `pki.ca_pem()` holds that bundle, so the
    /// anonymous `/health` client works. `pki.issue` is not available on such a cluster.
    pub fn with_spire(spire: &spire::Spire, keepers: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("spire-bundle");
        let nexus_svid = dir.path().join("nexus");
        spire.write_svid_files(spire.uid("nexus"), &nexus_svid);
        fs::create_dir_all(&ca_dir).unwrap();
        fs::copy(nexus_svid.join("svid_bundle.pem"), ca_dir.join("ca.pem")).unwrap();
        let keepers = (1..=keepers)
            .map(|i| {
                let svid = dir.path().join(format!("keeper-{i}"));
                spire.write_svid_files(spire.uid(&format!("keeper-{i}")), &svid);
                Proc::start(
                    &format!("keeper-{i}"),
                    dir.path(),
                    &["keeper"],
                    server_env(&svid, &[("SPIKE_KEEPER_TLS_PORT", "127.0.0.1:0")]),
                )
            })
            .collect();
        let data_dir = dir.path().join("data");
        let pki = Pki {
            root: dir.path().to_path_buf(),
            ca_dir,
            trust_domain: TD.to_string(),
        };
        Cluster {
            dir,
            pki,
            keepers,
            nexus: Vec::new(),
            nexus_svid,
            data_dir,
        }
    }

    /// Starts one more Keeper (`keeper-<n>`, SPIFFE ID `/spike/keeper/<n>`) and returns its
    /// index in `self.keepers`. Nexus instances started before do not know it.
    pub fn add_keeper(&mut self) -> usize {
        let n = self.keepers.len() + 1;
        let svid = self
            .pki
            .issue(&format!("keeper-{n}"), &format!("/spike/keeper/{n}"));
        self.keepers.push(Proc::start(
            &format!("keeper-{n}"),
            self.dir.path(),
            &["keeper"],
            server_env(&svid, &[("SPIKE_KEEPER_TLS_PORT", "127.0.0.1:0")]),
        ));
        n - 1
    }

    /// `SPIKE_NEXUS_KEEPER_PEERS` for the running Keepers.
    pub fn peers(&self) -> String {
        self.keeper_urls().join(",")
    }

    /// The running Keepers' URLs (no trailing slash), in order: a rekey's `keepers` list.
    pub fn keeper_urls(&self) -> Vec<String> {
        self.keepers
            .iter()
            .map(|k| k.url().to_string().trim_end_matches('/').to_string())
            .collect()
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
        self.start_nexus_together(1, extra)[0]
    }

    /// Starts `n` Nexus instances together: every process is spawned before the test waits for
    /// any of them to listen. Returns their indexes in `self.nexus`.
    pub fn start_nexus_together(&mut self, n: usize, extra: &[(&str, &str)]) -> Vec<usize> {
        let first = self.nexus.len();
        for i in first..first + n {
            let env = self.nexus_env(extra);
            let name = format!("nexus-{}", i + 1);
            self.nexus
                .push(Proc::launch(&name, self.dir.path(), &["nexus"], env));
        }
        for proc in &mut self.nexus[first..] {
            proc.wait_listening();
        }
        (first..first + n).collect()
    }

    /// Starts a Nexus that writes its audit trail to `audit.jsonl` in the cluster's directory;
    /// returns the file, the instance's index in `self.nexus` and its URL once it is ready.
    pub async fn start_audited_nexus(&mut self) -> (PathBuf, usize, Uri) {
        let file = self.dir.path().join("audit.jsonl");
        let n = self.start_nexus(&[("SPIKE_NEXUS_AUDIT_FILE", file.to_str().unwrap())]);
        let url = self.nexus[n].url();
        wait_status(&self.anonymous(), &url, "ready").await;
        (file, n, url)
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
            .post_json(&self.keepers[i].url(), SHARD_PATH, b"{}".to_vec())
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

    /// A client with the superuser operator's SVID.
    pub fn superuser(&self) -> HttpsClient {
        self.api_client("superuser", "/spike/pilot/role/superuser")
    }

    /// Starts `n` Nexus instances together ([`Cluster::start_nexus_together`]) and returns
    /// their URLs once each answers `/health` with `ready`.
    pub async fn start_ready_together(&mut self, n: usize, extra: &[(&str, &str)]) -> Vec<Uri> {
        let urls: Vec<Uri> = self
            .start_nexus_together(n, extra)
            .into_iter()
            .map(|i| self.nexus[i].url())
            .collect();
        for url in &urls {
            wait_status(&self.anonymous(), url, "ready").await;
        }
        urls
    }

    /// Exports the recovery shards of the Nexus at `url` into `dir` with the real CLI, as a
    /// recover-role operator.
    pub fn export_recovery_shards(&self, url: &str, dir: &Path) {
        let svid = self.pki.issue("recover-op", "/spike/pilot/role/recover");
        let (code, _, err) = run_spike(
            &["recover", "export", dir.to_str().unwrap()],
            &client_env(url, &svid),
        );
        assert_eq!(code, 0, "{err}");
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

/// The root key of the cluster, rebuilt from its Keepers' shards once every Keeper holds one.
pub async fn root_key(c: &Cluster) -> spike::crypto::RootKey {
    let mut shares = Vec::new();
    for i in 0..c.keepers.len() {
        let (index, value) = wait_for("a Keeper's shard", Duration::from_secs(20), || {
            c.keeper_shard(i)
        })
        .await;
        shares.push(spike::crypto::Share::new(index.unwrap(), value).unwrap());
    }
    spike::crypto::combine(&shares).unwrap()
}

/// Opens the cluster's store from the test process, as its administrator.
pub async fn admin_store(c: &Cluster, env: &[(String, String)]) -> spike::store::AnyStore {
    let var = |k: &str| {
        env.iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.clone())
    };
    if let Some(bucket) = var("SPIKE_NEXUS_S3_BUCKET") {
        let cfg = spike::store::S3Config {
            endpoint: var("SPIKE_NEXUS_S3_ENDPOINT"),
            bucket,
            prefix: var("SPIKE_NEXUS_S3_PREFIX").unwrap(),
            region: var("SPIKE_NEXUS_S3_REGION").unwrap(),
            path_style: true,
            credentials: spike::store::S3Credentials {
                access_key_id: var("AWS_ACCESS_KEY_ID").unwrap(),
                secret_access_key: var("AWS_SECRET_ACCESS_KEY").unwrap(),
                session_token: None,
            },
        };
        return spike::store::AnyStore::S3(spike::store::s3::S3Store::open(&cfg).unwrap());
    }
    match env.iter().find(|(k, _)| k == "SPIKE_NEXUS_DB_URL") {
        Some((_, url)) => spike::store::AnyStore::Postgres(
            spike::store::postgres::PostgresStore::open(url)
                .await
                .unwrap(),
        ),
        None => spike::store::AnyStore::Sqlite(
            spike::store::sqlite::SqliteStore::open(&c.data_dir)
                .await
                .unwrap(),
        ),
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

/// [`call`] that must answer 200: returns the parsed answer.
pub async fn call_ok(
    client: &HttpsClient,
    url: &Uri,
    path: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let (s, b) = call(client, url, path, body).await;
    assert_eq!(s, StatusCode::OK, "{path}: {b}");
    b
}

/// `spike audit verify --recover-dir SHARDS FILES...`: (exit code, stdout, stderr).
pub fn audit_verify(shards: &Path, files: &[&Path]) -> (i32, String, String) {
    audit_verify_with(&[shards], files)
}

/// `spike audit verify --recover-dir D1 --recover-dir D2 ... FILES...` (a trail that spans a
/// rekey needs the recovery shards of each root key): (exit code, stdout, stderr).
pub fn audit_verify_with(dirs: &[&Path], files: &[&Path]) -> (i32, String, String) {
    let mut args = vec!["audit", "verify"];
    for dir in dirs {
        args.extend(["--recover-dir", dir.to_str().unwrap()]);
    }
    args.extend(files.iter().map(|f| f.to_str().unwrap()));
    run_spike(&args, &[])
}

/// Writes `lines` (each without its newline) as a file named `name` beside `like`.
pub fn write_lines(like: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = like.with_file_name(name);
    fs::write(
        &path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    path
}

/// Borrowed `(name, value)` pairs from owned ones, for `Cluster::start_nexus`.
pub fn pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Awaits every task of `tasks` and returns their outputs in completion order. A task that
/// panicked fails the test with its own panic (a `join_next` loop that drops the `JoinError`
/// would hide the assertion that failed inside the task).
pub async fn join_all<T: 'static>(mut tasks: tokio::task::JoinSet<T>) -> Vec<T> {
    let mut out = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(v) => out.push(v),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("a task was cancelled: {e}"),
        }
    }
    out
}

/// How a server turned a TLS client away: the alert it sent. Fails the test if the server
/// accepted the client and answered, or closed without an alert (a dead server, a cap, a
/// timeout are not a refusal of the identity).
pub async fn tls_refusal(
    tls: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> rustls::AlertDescription {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let alert = |e: &std::io::Error| match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => Some(*alert),
        _ => None,
    };
    let limit = Duration::from_secs(10);
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{addr} does not accept connections: {e}"));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let connect = tokio_rustls::TlsConnector::from(tls).connect(name, tcp);
    let mut stream = match tokio::time::timeout(limit, connect).await {
        Err(_) => panic!("the TLS handshake with {addr} neither finished nor failed in {limit:?}"),
        Ok(Err(e)) => {
            return alert(&e)
                .unwrap_or_else(|| panic!("{addr} closed the handshake without an alert: {e}"));
        }
        Ok(Ok(stream)) => stream,
    };
    // TLS 1.3: the client finishes its side before the server has checked the client's
    // certificate, so the server's refusal arrives as the answer to the first request.
    let request = b"POST /v1/store/shard HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    let exchange = async {
        stream.write_all(request).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.map(|_| answer)
    };
    match tokio::time::timeout(limit, exchange).await {
        Err(_) => panic!("{addr} neither answered nor refused in {limit:?}"),
        Ok(Ok(answer)) => panic!(
            "{addr} accepted the client and answered: {}",
            String::from_utf8_lossy(&answer)
        ),
        Ok(Err(e)) => {
            alert(&e).unwrap_or_else(|| panic!("{addr} dropped the client without an alert: {e}"))
        }
    }
}

/// A Nexus or a Keeper running inside the test process, on a listener the test bound before
/// starting it: its address is known at once and nothing is read from logs.
pub struct InProcess {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

impl InProcess {
    /// A Keeper configured by `env` (as `spike keeper` would read it).
    pub async fn keeper(env: &HashMap<String, String>) -> InProcess {
        let cfg = spike::keeper::KeeperConfig::from_source(env).unwrap();
        InProcess::start(move |listener, stop| async move {
            spike::keeper::run_on(cfg, listener, async move {
                let _ = stop.await;
            })
            .await
            .map_err(|e| e.to_string())
        })
        .await
    }

    /// A Nexus configured by `env` (as `spike nexus` would read it).
    pub async fn nexus(env: &HashMap<String, String>) -> InProcess {
        let cfg = spike::nexus::NexusConfig::from_source(env).unwrap();
        InProcess::start(move |listener, stop| async move {
            spike::nexus::run_on(cfg, listener, async move {
                let _ = stop.await;
            })
            .await
            .map_err(|e| e.to_string())
        })
        .await
    }

    async fn start<F, Fut>(run: F) -> InProcess
    where
        F: FnOnce(tokio::net::TcpListener, tokio::sync::oneshot::Receiver<()>) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(run(listener, stopped));
        InProcess {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> Uri {
        format!("https://{}", self.addr).parse().unwrap()
    }

    /// Asks it to shut down and checks that it stopped without an error.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        match tokio::time::timeout(Duration::from_secs(30), task).await {
            Err(_) => panic!("the in-process server did not stop in 30 s"),
            Ok(joined) => joined.unwrap().unwrap(),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
