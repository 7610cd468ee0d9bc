//! SPIRE for tests: the real server and agent that `./test` starts with `scripts/spire.sh`
//! (trust domain spike.ist, and a second pair for other.td), and workloads run under the uids
//! its registration entries select (the script's header says why uids).
//!
//! A test gets the shared instance with [`Spire::shared`] (or [`Spire::other`]) and skips when
//! it returns `None`:
//!
//! ```ignore
//! let Some(spire) = Spire::shared() else { return };
//! let mut nexus = spire.command_as(spire.uid("nexus"), spike_bin());
//! ```
//!
//! Without the exports it is `None` with a note on stderr, unless `CI` or `SPIKE_REQUIRE_SPIRE`
//! is set (to anything but `0`/`false`), when it panics. The registered identities are shared
//! by every test: a test that deletes or changes entries makes its own on [`fresh_uid`].
//!
//! Std only, so a test may include this file alone (`#[path = "common/spire.rs"]`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// One running SPIRE server and agent, as `scripts/spire.sh start` exported it.
#[derive(Clone, Debug)]
pub struct Spire {
    /// The directory given to `scripts/spire.sh start`.
    pub dir: PathBuf,
    pub trust_domain: String,
    /// The agent's Workload API socket (a path, without `unix://`).
    pub socket: PathBuf,
    /// The server's API socket (for `spire-server ... -socketPath`).
    pub server_socket: PathBuf,
    pub server_bin: PathBuf,
    pub agent_bin: PathBuf,
}

/// A registered identity: `scripts/spire.sh` writes them to `DIR/identities`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// `nexus`, `keeper-1`..`keeper-3`, `superuser`, `recover`, `restore`, `app-one`,
    /// `app-two`, `unregistered`.
    pub name: String,
    pub uid: u32,
    /// `None` for `unregistered`, the uid no entry selects.
    pub spiffe_id: Option<String>,
}

/// How long a wait for the agent may take: entries reach it within about two seconds.
pub const WAIT: Duration = Duration::from_secs(30);

fn required() -> bool {
    ["CI", "SPIKE_REQUIRE_SPIRE"].iter().any(|k| {
        std::env::var(k)
            .map(|v| !matches!(v.trim(), "" | "0" | "false"))
            .unwrap_or(false)
    })
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/spire.sh")
}

impl Spire {
    /// The spike.ist instance `./test` started.
    pub fn shared() -> Option<Spire> {
        Spire::from_env("SPIKE_TEST_SPIRE_", "SPIKE_TEST_SPIFFE_ENDPOINT_SOCKET")
    }

    /// The other.td instance `./test` started (for workloads of a foreign trust domain).
    pub fn other() -> Option<Spire> {
        Spire::from_env(
            "SPIKE_TEST_SPIRE_OTHER_",
            "SPIKE_TEST_SPIRE_OTHER_SPIFFE_ENDPOINT_SOCKET",
        )
    }

    fn from_env(prefix: &str, socket_var: &str) -> Option<Spire> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let Some(endpoint) = var(socket_var) else {
            let flag = if prefix.contains("OTHER") {
                " --trust-domain other.td"
            } else {
                ""
            };
            let why = format!(
                "{socket_var} is not set: the SPIRE tests need the SPIRE server and agent that \
                 ./test starts (eval \"$(scripts/spire.sh start DIR{flag})\")"
            );
            if required() {
                panic!("{why}; CI or SPIKE_REQUIRE_SPIRE is set, so this is a failure");
            }
            eprintln!("note: skipping: {why}");
            return None;
        };
        let must = |k: String| var(&k).unwrap_or_else(|| panic!("{k} is not set"));
        let socket = endpoint
            .strip_prefix("unix://")
            .unwrap_or_else(|| panic!("{socket_var}={endpoint} is not unix://PATH"));
        Some(Spire {
            dir: must(format!("{prefix}DIR")).into(),
            trust_domain: must(format!("{prefix}TRUST_DOMAIN")),
            socket: socket.into(),
            server_socket: must(format!("{prefix}SERVER_SOCKET")).into(),
            server_bin: must("SPIKE_TEST_SPIRE_SERVER_BIN".into()).into(),
            agent_bin: must("SPIKE_TEST_SPIRE_AGENT_BIN".into()).into(),
        })
    }

    /// `unix://SOCKET`, the value of `SPIFFE_ENDPOINT_SOCKET` for a workload.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// `spiffe://TD/PATH` in this trust domain.
    pub fn id(&self, path: &str) -> String {
        format!("spiffe://{}{path}", self.trust_domain)
    }

    /// `spiffe://TD`: the trust domain as `-federatesWith` and `bundle set -id` name it.
    pub fn td_id(&self) -> String {
        format!("spiffe://{}", self.trust_domain)
    }

    /// `spire-server ARGS -socketPath SERVER_SOCKET`: its stdout, or why it failed.
    fn server(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.server_bin)
            .args(args)
            .arg("-socketPath")
            .arg(&self.server_socket)
            .stdin(Stdio::null())
            .output()
            .expect("run spire-server");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// This server's own X.509 bundle, PEM (`spire-server bundle show`).
    pub fn bundle_pem(&self) -> String {
        self.server(&["bundle", "show"])
            .unwrap_or_else(|e| panic!("bundle show on {}: {e}", self.trust_domain))
    }

    /// Makes `pem` the federated bundle of trust domain `td` on this server, replacing any
    /// earlier one (`spire-server bundle set`, as a bundle endpoint refresh would): the agent
    /// hands it to every workload whose entry federates with `td`.
    pub fn set_federated_bundle(&self, td: &str, pem: &str) {
        let file = self.dir.join(format!("federated-{td}.pem"));
        std::fs::write(&file, pem).expect("write the federated bundle");
        let id = format!("spiffe://{td}");
        let path = file.to_str().expect("a UTF-8 path");
        self.server(&["bundle", "set", "-id", &id, "-format", "pem", "-path", path])
            .unwrap_or_else(|e| panic!("bundle set {td} on {}: {e}", self.trust_domain));
    }

    /// Removes the federated bundle of `td` and every entry's federation with it (`spire-server
    /// bundle delete -mode dissociate`); nothing to remove is fine.
    pub fn delete_federated_bundle(&self, td: &str) {
        let id = format!("spiffe://{td}");
        if let Err(e) = self.server(&["bundle", "delete", "-id", &id, "-mode", "dissociate"]) {
            assert!(
                e.contains("NotFound") || e.contains("not found"),
                "bundle delete {td}: {e}"
            );
        }
    }

    /// Every registered identity (and `unregistered`).
    pub fn identities(&self) -> Vec<Identity> {
        let table = std::fs::read_to_string(self.dir.join("identities"))
            .unwrap_or_else(|e| panic!("read {}/identities: {e}", self.dir.display()));
        table
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (name, uid, id) = (f.next()?, f.next()?, f.next()?);
                Some(Identity {
                    name: name.to_string(),
                    uid: uid.parse().expect("a numeric uid"),
                    spiffe_id: (id != "-").then(|| id.to_string()),
                })
            })
            .collect()
    }

    /// The uid of a registered identity, e.g. `uid("keeper-2")`.
    pub fn uid(&self, name: &str) -> u32 {
        self.identities()
            .into_iter()
            .find(|i| i.name == name)
            .unwrap_or_else(|| panic!("no identity {name} in {}/identities", self.dir.display()))
            .uid
    }

    /// A command that runs `program` as the workload with `uid`, pointed at this agent
    /// (`SPIFFE_ENDPOINT_SOCKET`). The process keeps root's file access (ambient
    /// CAP_DAC_OVERRIDE) but not its uid, so it sees the test's files as before while the agent
    /// sees the identity.
    pub fn command_as(&self, uid: u32, program: impl AsRef<Path>) -> Command {
        let mut cmd = as_uid(uid, program);
        cmd.env("SPIFFE_ENDPOINT_SOCKET", self.endpoint());
        cmd
    }

    /// The SPIFFE IDs the agent serves to `uid` right now (`spire-agent api fetch x509` run as
    /// that uid), or the agent's refusal.
    pub fn fetch_x509(&self, uid: u32) -> Result<Vec<String>, String> {
        let out = self
            .command_as(uid, &self.agent_bin)
            .args(["api", "fetch", "x509", "-timeout", "5s", "-socketPath"])
            .arg(&self.socket)
            .stdin(Stdio::null())
            .output()
            .expect("run spire-agent api fetch x509 under setpriv");
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "{}{}",
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(stdout
            .lines()
            .filter_map(|l| l.strip_prefix("SPIFFE ID:"))
            .map(|id| id.trim().to_string())
            .collect())
    }

    /// Writes the SVID the agent serves `uid` into `dir` in spiffe-helper's layout
    /// (`svid.pem`, `svid_key.pem`, `svid_bundle.pem`), for processes that read SVID files.
    pub fn write_svid_files(&self, uid: u32, dir: &Path) {
        std::fs::create_dir_all(dir).expect("create the SVID directory");
        let out = self
            .command_as(uid, &self.agent_bin)
            .args(["api", "fetch", "x509", "-timeout", "10s", "-socketPath"])
            .arg(&self.socket)
            .arg("-write")
            .arg(dir)
            .stdin(Stdio::null())
            .output()
            .expect("run spire-agent api fetch x509 -write");
        assert!(
            out.status.success(),
            "uid {uid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (from, to) in [
            ("svid.0.pem", "svid.pem"),
            ("svid.0.key", "svid_key.pem"),
            ("bundle.0.pem", "svid_bundle.pem"),
        ] {
            std::fs::rename(dir.join(from), dir.join(to)).expect("rename the fetched SVID file");
        }
    }

    /// Waits until the agent serves `uid` exactly the SVID `spiffe_id`.
    pub fn wait_for_svid(&self, uid: u32, spiffe_id: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.fetch_x509(uid);
            if got.as_deref() == Ok(&[spiffe_id.to_string()][..]) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "uid {uid} still not served {spiffe_id} after {WAIT:?}: {got:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the agent refuses `uid` any SVID.
    pub fn wait_for_no_svid(&self, uid: u32) {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.fetch_x509(uid);
            if got.is_err() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "uid {uid} still served after {WAIT:?}: {got:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn script(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(script())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/spire.sh");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// Registers `spiffe_id` (a full ID, or a path in this trust domain) for `uid`, with
    /// `spire-server entry create` flags such as `["-x509SVIDTTL", "60"]`, and returns the entry
    /// ID. The agent serves it within about two seconds ([`Spire::wait_for_svid`]).
    pub fn create_entry(&self, uid: u32, spiffe_id: &str, flags: &[&str]) -> String {
        let dir = self.dir.to_str().unwrap();
        let uid = uid.to_string();
        let mut args = vec!["entry", dir, "create", &uid, spiffe_id];
        args.extend_from_slice(flags);
        self.script(&args)
            .unwrap_or_else(|e| panic!("create entry {spiffe_id} for uid {uid}: {e}"))
    }

    /// Deletes the entries that match `what`: an entry ID, `uid:N`, or a SPIFFE ID (or path).
    /// Fails if none does.
    pub fn delete_entry(&self, what: &str) {
        let dir = self.dir.to_str().unwrap();
        self.script(&["entry", dir, "delete", what])
            .unwrap_or_else(|e| panic!("delete entry {what}: {e}"));
    }

    /// Deletes every entry for `uid`, if any.
    pub fn clear_uid(&self, uid: u32) {
        let dir = self.dir.to_str().unwrap();
        let _ = self.script(&["entry", dir, "delete", &format!("uid:{uid}")]);
    }
}

/// The agent stopped by [`Spire::stop_agent`]; started again by [`AgentOutage::end`], or on
/// drop when an assertion fails first, so one failing test does not leave later ones without
/// an agent.
pub struct AgentOutage {
    spire: Option<Spire>,
}

impl Spire {
    /// Stops the agent (SIGTERM), as an agent restart or crash would; the server keeps running.
    pub fn stop_agent(&self) -> AgentOutage {
        let pid = std::fs::read_to_string(self.dir.join("agent.pid")).expect("read agent.pid");
        let ok = Command::new("kill")
            .args(["-TERM", pid.trim()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -TERM {}", pid.trim());
        AgentOutage {
            spire: Some(self.clone()),
        }
    }

    /// Starts the agent again (`scripts/spire.sh start`: a new agent, attested afresh).
    fn start_agent(&self) -> Result<String, String> {
        self.script(&["start", self.dir.to_str().unwrap()])
    }
}

impl AgentOutage {
    /// Starts the agent again; fails the test if it does not come up.
    pub fn end(mut self) {
        if let Some(spire) = self.spire.take() {
            spire
                .start_agent()
                .unwrap_or_else(|e| panic!("restart the agent: {e}"));
        }
    }
}

impl Drop for AgentOutage {
    fn drop(&mut self) {
        if let Some(spire) = self.spire.take() {
            let _ = spire.start_agent();
        }
    }
}

/// A uid no registered identity and no other test process uses (47100-47999), for a test's own
/// entries; any entry a crashed earlier run left on it is deleted first (on the shared
/// spike.ist instance, and on other.td when that runs).
pub fn fresh_uid() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    assert!(n < 30, "more than 30 fresh uids in one test process");
    let uid = 47100 + (std::process::id() % 30) * 30 + n;
    for spire in [Spire::shared_quiet(), Spire::other_quiet()]
        .into_iter()
        .flatten()
    {
        spire.clear_uid(uid);
    }
    uid
}

impl Spire {
    fn shared_quiet() -> Option<Spire> {
        std::env::var_os("SPIKE_TEST_SPIFFE_ENDPOINT_SOCKET").and_then(|_| Spire::shared())
    }

    fn other_quiet() -> Option<Spire> {
        std::env::var_os("SPIKE_TEST_SPIRE_OTHER_SPIFFE_ENDPOINT_SOCKET")
            .and_then(|_| Spire::other())
    }
}

/// A command that runs `program` under `uid` (and its gid), keeping root's file access
/// (ambient CAP_DAC_OVERRIDE): the SPIRE agent's unix attestor sees `uid`.
pub fn as_uid(uid: u32, program: impl AsRef<Path>) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", &uid.to_string(), "--regid", &uid.to_string()])
        .args(["--clear-groups", "--inh-caps", "+dac_override"])
        .args(["--ambient-caps", "+dac_override", "--"])
        .arg(program.as_ref());
    cmd
}
