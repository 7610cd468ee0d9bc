#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! Identity from a real SPIRE agent's Workload API (issue 14): Keepers, Nexus and the CLI take
//! their SVIDs from `SPIFFE_ENDPOINT_SOCKET`, each process running as the uid its registration
//! entry selects (tests/common/spire.rs, scripts/spire.sh). Rotations and an agent outage cost
//! no request; a workload of another trust domain, or one whose entry was deleted, is refused.
//!
//! The tests change the shared agent (entries, a restart), so they run one at a time.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::spire::{Spire, fresh_uid};
use common::*;
use hyper::StatusCode;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Environment of a process that takes its identity from `spire`'s agent.
fn agent_env(spire: &Spire, extra: &[(&str, &str)]) -> HashMap<String, String> {
    let mut env = HashMap::new();
    env.insert("SPIFFE_ENDPOINT_SOCKET".to_string(), spire.endpoint());
    env.insert("SPIKE_TRUST_ROOT".to_string(), TD.to_string());
    env.insert("SPIKE_SYSTEM_LOG_LEVEL".to_string(), "info".to_string());
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    env
}

/// Writes the agent's current bundle where `pki` keeps its CA, for the test's own clients.
fn fetch_bundle(spire: &Spire, pki: &Pki) {
    spire.write_svid_files(spire.uid("superuser"), &pki.ca_dir);
    std::fs::copy(
        pki.ca_dir.join("svid_bundle.pem"),
        pki.ca_dir.join("ca.pem"),
    )
    .unwrap();
}

/// Keepers and Nexus instances running as SPIRE workloads.
struct AgentCluster {
    dir: tempfile::TempDir,
    keepers: Vec<Proc>,
    nexus: Vec<Proc>,
    /// SPIRE's bundle, for the test's own `/health` client.
    pki: Pki,
    /// `SPIKE_NEXUS_KEEPER_PEERS` and `SPIKE_NEXUS_DATA_DIR` of the Nexus instances.
    peers: String,
    data: std::path::PathBuf,
}

impl AgentCluster {
    fn start(spire: &Spire, keeper_uids: &[u32], nexus_uids: &[u32]) -> AgentCluster {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki {
            root: dir.path().to_path_buf(),
            ca_dir: dir.path().join("bundle"),
            trust_domain: TD.to_string(),
        };
        fetch_bundle(spire, &pki);
        let keepers: Vec<Proc> = keeper_uids
            .iter()
            .enumerate()
            .map(|(i, uid)| {
                Proc::start_as(
                    *uid,
                    &format!("keeper-{}", i + 1),
                    dir.path(),
                    &["keeper"],
                    agent_env(spire, &[("SPIKE_KEEPER_TLS_PORT", "127.0.0.1:0")]),
                )
            })
            .collect();
        let peers = keepers
            .iter()
            .map(|k| k.base_url())
            .collect::<Vec<_>>()
            .join(",");
        let data = dir.path().join("data");
        let mut c = AgentCluster {
            dir,
            keepers,
            nexus: Vec::new(),
            pki,
            peers,
            data,
        };
        for uid in nexus_uids {
            c.start_nexus(spire, *uid, &[]);
        }
        c
    }

    /// Starts one more Nexus as the workload `uid` on the cluster's Keepers and store, with
    /// `extra` on top of the common settings.
    fn start_nexus(&mut self, spire: &Spire, uid: u32, extra: &[(&str, &str)]) {
        let shares = self.keepers.len().to_string();
        let mut settings = vec![
            ("SPIKE_NEXUS_TLS_PORT", "127.0.0.1:0"),
            ("SPIKE_NEXUS_KEEPER_PEERS", self.peers.as_str()),
            ("SPIKE_NEXUS_SHAMIR_SHARES", shares.as_str()),
            ("SPIKE_NEXUS_DATA_DIR", self.data.to_str().unwrap()),
            ("SPIKE_NEXUS_RECOVERY_MAX_INTERVAL", "500ms"),
        ];
        settings.extend_from_slice(extra);
        let name = format!("nexus-{}", self.nexus.len() + 1);
        let proc = Proc::start_as(
            uid,
            &name,
            self.dir.path(),
            &["nexus"],
            agent_env(spire, &settings),
        );
        self.nexus.push(proc);
    }

    fn urls(&self) -> String {
        self.nexus
            .iter()
            .map(Proc::base_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn wait_ready(&self) {
        let anon = client(None, &self.pki, spike::identity::Role::Nexus);
        for n in &self.nexus {
            wait_status(&anon, &n.url(), "ready").await;
        }
    }

    fn logs(&self) -> String {
        self.keepers
            .iter()
            .chain(self.nexus.iter())
            .map(|p| format!("===== {} =====\n{}", p.name, p.logs()))
            .collect()
    }
}

/// Runs `spike ARGS` as the workload `uid` of `spire`'s agent with only `env` (and `PATH`) in
/// its environment: (exit status, stdout, stderr).
fn run_as(spire: &Spire, uid: u32, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = spire.command_as(uid, spike_bin());
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SPIFFE_ENDPOINT_SOCKET", spire.endpoint())
        .env("SPIKE_SPIFFE_SOURCE_TIMEOUT", "10s")
        .envs(env.iter().copied());
    let out = common::process::output_within(&mut cmd, common::process::COMMAND_LIMIT);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `spike backup ARGS` as the workload `uid` with the Nexus settings of `c` and the
/// agent's socket, as spike-backup.service runs it with SPIFFE_ENDPOINT_SOCKET in nexus.env.
fn backup_as(spire: &Spire, c: &AgentCluster, uid: u32, args: &[&str]) -> (i32, String, String) {
    let args = [&["backup"], args].concat();
    let shares = c.keepers.len().to_string();
    let env = [
        ("SPIKE_TRUST_ROOT", TD),
        ("SPIKE_NEXUS_KEEPER_PEERS", c.peers.as_str()),
        ("SPIKE_NEXUS_SHAMIR_SHARES", shares.as_str()),
        ("SPIKE_NEXUS_DATA_DIR", c.data.to_str().unwrap()),
    ];
    run_as(spire, uid, &args, &env)
}

/// Runs `spike ARGS` as the workload `uid` against `urls`: (exit status, stdout, stderr).
fn cli_as(spire: &Spire, uid: u32, urls: &str, args: &[&str]) -> (i32, String, String) {
    let env = [("SPIKE_TRUST_ROOT", TD), ("SPIKE_NEXUS_API_URL", urls)];
    run_as(spire, uid, args, &env)
}

fn keepers(spire: &Spire) -> Vec<u32> {
    (1..=3).map(|i| spire.uid(&format!("keeper-{i}"))).collect()
}

/// Three Keepers and two Nexus get every identity from the agent, reach ready and serve the
/// CLI, which takes its identity from the agent too. Policies decide for workloads; a workload
/// whose entry is deleted, and one of another trust domain, are refused; the cluster stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepers_nexus_and_cli_take_their_identity_from_the_agent() {
    let Some(spire) = Spire::shared() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    let nexus = spire.uid("nexus");
    let c = AgentCluster::start(&spire, &keepers(&spire), &[nexus, nexus]);
    c.wait_ready().await;
    let urls = c.urls();
    let su = spire.uid("superuser");
    let (code, _, err) = cli_as(&spire, su, &urls, &["secret", "put", "apps/one/db", "k=v"]);
    assert_eq!(code, 0, "{err}\n{}", c.logs());

    // spike backup gets the root key from the Keepers with the Nexus identity the agent gives
    // it, and verifies with it; another identity gets no shard and writes no backup.
    let file = c.dir.path().join("agent-backup.jsonl");
    let path = file.to_str().unwrap();
    let (code, _, err) = backup_as(&spire, &c, su, &["create", "--out", path]);
    assert_ne!(code, 0, "a backup as the superuser: {err}");
    assert!(err.contains("as a Nexus"), "{err}");
    assert!(!file.exists());
    let (code, _, err) = backup_as(&spire, &c, nexus, &["create", "--out", path]);
    assert_eq!(code, 0, "{err}\n{}", c.logs());
    let (code, out, err) = backup_as(&spire, &c, nexus, &["verify", path]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("its MAC verifies"), "{out}");
    for n in &c.nexus {
        let (code, out, err) = cli_as(
            &spire,
            su,
            &n.base_url(),
            &["secret", "get", "apps/one/db", "k"],
        );
        assert_eq!((code, out.trim()), (0, "v"), "{err}");
        // The answer alone: no log line about the SVID the agent handed the command.
        assert_eq!(err, "", "a successful command wrote to stderr");
    }

    // The recover operator exports the recovery shards with the identity the agent gives it;
    // the superuser may not.
    let shards = c.dir.path().join("recovery");
    let shards_arg = shards.to_str().unwrap();
    let (code, _, err) = cli_as(&spire, su, &urls, &["recover", "export", shards_arg]);
    assert_ne!(code, 0, "the superuser exported recovery shards");
    assert!(
        err.contains("needs an operator SVID with the recover role")
            && err.contains("your SVID is spiffe://spike.ist/spike/pilot/role/superuser"),
        "{err}"
    );
    let rec = spire.uid("recover");
    let (code, _, err) = cli_as(&spire, rec, &urls, &["recover", "export", shards_arg]);
    assert_eq!(code, 0, "{err}");
    assert!(shards.join("spike.recovery.1.txt").exists());

    // A workload: refused until a policy names it, then served.
    let one = spire.uid("app-one");
    let (code, _, err) = cli_as(&spire, one, &urls, &["secret", "get", "apps/one/db", "k"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("access_unauthorized"), "{err}");
    let (code, _, err) = cli_as(
        &spire,
        su,
        &urls,
        &[
            "policy",
            "create",
            "--name",
            "apps",
            "--spiffeid-pattern",
            "^spiffe://spike\\.ist/app/.*$",
            "--path-pattern",
            "^apps/one/.*$",
            "--permissions",
            "read",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = cli_as(&spire, one, &urls, &["secret", "get", "apps/one/db", "k"]);
    assert_eq!((code, out.trim()), (0, "v"), "{err}");

    // A registration deleted: the workload gets no SVID any more and is refused.
    let three = fresh_uid();
    let entry = spire.create_entry(three, &spire.id("/app/three"), &[]);
    spire.wait_for_svid(three, &spire.id("/app/three"));
    let (code, out, err) = cli_as(&spire, three, &urls, &["secret", "get", "apps/one/db", "k"]);
    assert_eq!((code, out.trim()), (0, "v"), "{err}");
    spire.delete_entry(&entry);
    spire.wait_for_no_svid(three);
    let (code, out, err) = cli_as(&spire, three, &urls, &["secret", "get", "apps/one/db", "k"]);
    assert_ne!(code, 0, "a deleted registration was served: {out}");
    assert!(out.trim().is_empty(), "{out}");
    assert!(err.contains("SPIFFE") || err.contains("SVID"), "{err}");

    // Another trust domain: a workload of other.td, with its own SVID, is refused at the
    // handshake by Nexus, which stays up.
    if let Some(other) = Spire::other() {
        let dir = c.dir.path().join("other-td");
        other.write_svid_files(other.uid("app-one"), &dir);
        // Its own SVID, spike.ist's bundle for the server: common::client does exactly that.
        let foreign = client(Some(&dir), &c.pki, spike::identity::Role::Nexus);
        let reply = foreign
            .post_json(
                &c.nexus[0].url(),
                "/v1/store/secrets?action=get",
                br#"{"path":"apps/one/db"}"#.to_vec(),
            )
            .await;
        if let Ok(r) = reply {
            panic!("a workload of other.td was answered {}", r.status);
        }
        // The client can see the failed handshake before Nexus has written its line.
        let refused =
            |logs: &str| logs.contains("TLS handshake refused") && logs.contains("other.td");
        wait_for(
            "Nexus logs the refused handshake",
            Duration::from_secs(10),
            || {
                let logs = c.nexus[0].logs();
                async move { refused(&logs).then_some(()) }
            },
        )
        .await;
        let (code, out, _) = cli_as(&spire, su, &urls, &["secret", "get", "apps/one/db", "k"]);
        assert_eq!((code, out.trim()), (0, "v"));
    }
    assert!(!c.logs().contains("panicked"));
}

/// Counts the SVIDs `proc` took from the agent so far.
fn svids_taken(proc: &Proc) -> usize {
    proc.logs()
        .matches("SVID from the SPIFFE Workload API")
        .count()
}

/// Short-lived SVIDs (20 s) rotate several times during a run of requests through a Nexus and
/// three Keepers that all rotate too: no request fails. Then the agent is stopped for longer
/// than a rotation interval and started again: still no request fails, and rotation resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_and_an_agent_outage_cost_no_request() {
    let Some(spire) = Spire::shared() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    const TTL: &str = "20";
    let ttl = ["-x509SVIDTTL", TTL];
    let nexus_uid = fresh_uid();
    let keeper_uids: Vec<u32> = (0..3).map(|_| fresh_uid()).collect();
    let su = fresh_uid();
    let mut entries = vec![spire.create_entry(nexus_uid, &spire.id("/spike/nexus"), &ttl)];
    for k in &keeper_uids {
        entries.push(spire.create_entry(*k, &spire.id("/spike/keeper"), &ttl));
    }
    entries.push(spire.create_entry(su, &spire.id("/spike/pilot/role/superuser"), &ttl));
    spire.wait_for_svid(nexus_uid, &spire.id("/spike/nexus"));
    for k in &keeper_uids {
        spire.wait_for_svid(*k, &spire.id("/spike/keeper"));
    }
    spire.wait_for_svid(su, &spire.id("/spike/pilot/role/superuser"));
    let c = AgentCluster::start(&spire, &keeper_uids, &[nexus_uid]);
    c.wait_ready().await;
    let url = c.urls();
    let anon = client(None, &c.pki, spike::identity::Role::Nexus);

    // Requests until Nexus and every Keeper took at least three SVIDs (two rotations each).
    let mut sent = 0;
    let put = |i: usize| {
        let (code, _, err) = cli_as(
            &spire,
            su,
            &url,
            &["secret", "put", "rot/x", &format!("v={i}")],
        );
        assert_eq!(
            code,
            0,
            "request {i} failed during rotations: {err}\n{}",
            c.logs()
        );
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while c
        .keepers
        .iter()
        .chain(c.nexus.iter())
        .any(|p| svids_taken(p) < 3)
    {
        assert!(
            Instant::now() < deadline,
            "SVIDs did not rotate:\n{}",
            c.logs()
        );
        put(sent);
        sent += 1;
    }
    println!("{sent} requests across two rotations of every process, none failed");

    // The agent goes away right after a rotation, for longer than a rotation interval
    // (TTL / 2): the SVIDs in use stay valid and every request is served.
    let before = svids_taken(&c.nexus[0]);
    wait_for("a fresh rotation", Duration::from_secs(60), || {
        let taken = svids_taken(&c.nexus[0]);
        async move { (taken > before).then_some(()) }
    })
    .await;
    // Long-running clients keep the SVID they hold: the test's own client, with the shared
    // superuser's SVID (valid for an hour) read from the agent before the outage.
    let su_dir = c.dir.path().join("superuser");
    spire.write_svid_files(spire.uid("superuser"), &su_dir);
    let held = client(Some(&su_dir), &c.pki, spike::identity::Role::Nexus);
    let nexus_url = c.nexus[0].url();
    let put_held = |i: usize| {
        let held = held.clone();
        let url = nexus_url.clone();
        async move {
            let body = serde_json::json!({"path": "rot/held", "values": {"v": i.to_string()}});
            let (status, b) = call(&held, &url, spike::protocol::nexus::SECRETS_PATH, body).await;
            assert_eq!(status, StatusCode::OK, "request {i}: {b}");
        }
    };
    let stopped = Instant::now();
    let outage = spire.stop_agent();
    let away = Duration::from_secs(12);
    let mut during = 0;
    while stopped.elapsed() < away {
        put_held(sent).await;
        sent += 1;
        during += 1;
    }
    assert_eq!(health(&anon, &nexus_url).await.unwrap().0, StatusCode::OK);
    outage.end();
    let after = svids_taken(&c.nexus[0]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while svids_taken(&c.nexus[0]) <= after {
        assert!(
            Instant::now() < deadline,
            "no SVID after the agent came back:\n{}",
            c.logs()
        );
        put_held(sent).await;
        sent += 1;
    }
    // And new processes get SVIDs again.
    put(sent);
    println!("agent away {away:?}: {during} requests during the outage, none failed");
    for e in entries {
        spire.delete_entry(&e);
    }
    assert!(!c.logs().contains("panicked"));
}

/// Bad identity sources stop a server with a message naming the cause and exit status 3 (no
/// identity from the agent), or 2 when the configuration itself is ambiguous — never a server
/// that serves with an identity it cannot verify. No SPIRE needed.
#[test]
fn bad_identity_sources_stop_the_server_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_socket = dir.path().join("plain-file");
    std::fs::write(&not_a_socket, b"x").unwrap();
    let missing = format!("unix://{}/missing.sock", dir.path().display());
    let file = format!("unix://{}", not_a_socket.display());
    let svid_dir = dir.path().to_str().unwrap();
    // Sockets that are not a Workload API: one answers HTTP/1.1 (as a web server or the
    // Docker daemon would), one takes connections and says nothing.
    let http1 = dir.path().join("http1.sock");
    let silent = dir.path().join("silent.sock");
    let http1_listener = std::os::unix::net::UnixListener::bind(&http1).unwrap();
    let silent_listener = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut conn in http1_listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let http1 = format!("unix://{}", http1.display());
    let silent = format!("unix://{}", silent.display());
    /// (environment, exit status, words of the message)
    type Case<'a> = (&'a [(&'a str, &'a str)], i32, &'a str);
    let cases: &[Case] = &[
        (&[("SPIFFE_ENDPOINT_SOCKET", &missing)], 3, "does not exist"),
        (&[("SPIFFE_ENDPOINT_SOCKET", &file)], 3, "not a"),
        (
            &[("SPIFFE_ENDPOINT_SOCKET", &http1)],
            3,
            "names no SPIFFE Workload API",
        ),
        (
            &[("SPIFFE_ENDPOINT_SOCKET", &silent)],
            3,
            "nothing answered the Workload API call",
        ),
        (
            &[("SPIFFE_ENDPOINT_SOCKET", "tcp://127.0.0.1:1")],
            2,
            "SPIFFE_ENDPOINT_SOCKET",
        ),
        (
            &[
                ("SPIFFE_ENDPOINT_SOCKET", &missing),
                ("SPIKE_SVID_DIR", svid_dir),
            ],
            2,
            "SPIKE_SVID_DIR",
        ),
    ];
    for (env, want_code, want) in cases {
        let mut all = vec![
            ("SPIKE_KEEPER_TLS_PORT", "127.0.0.1:0"),
            ("SPIKE_SPIFFE_SOURCE_TIMEOUT", "1s"),
        ];
        all.extend_from_slice(env);
        let (code, _, err) = run_spike(&["keeper"], &all);
        assert_eq!(code, *want_code, "{env:?}: {err}");
        assert!(err.contains(want), "{env:?}: {err}");
        assert!(!err.contains("listening on"), "{env:?}: {err}");
    }
    drop(silent_listener);

    // Nothing configured: SPIRE's default socket, as in SPIKE. Where no agent is there, a
    // server and a client command stop at once, naming both ways to give an identity: they do
    // not wait out the source timeout (longer than run_spike's limit) for an agent nobody
    // said to expect.
    if !std::path::Path::new("/tmp/spire-agent/public/api.sock").exists() {
        let base = [
            ("SPIKE_KEEPER_TLS_PORT", "127.0.0.1:0"),
            ("SPIKE_SPIFFE_SOURCE_TIMEOUT", "600s"),
        ];
        for (args, want_code) in [(&["keeper"][..], 3), (&["secret", "list"], 2)] {
            let (code, _, err) = run_spike(args, &base);
            assert_eq!(code, want_code, "{args:?}: {err}");
            for want in [
                "no identity source",
                "/tmp/spire-agent/public/api.sock",
                "SPIKE_SVID_DIR",
            ] {
                assert!(err.contains(want), "{args:?}: no {want:?} in {err}");
            }
        }
    }
}

/// How many SVID or bundle updates from the agent `proc` took in so far.
fn updates_taken(proc: &Proc) -> usize {
    let logs = proc.logs();
    logs.matches("SVID from the SPIFFE Workload API").count()
        + logs
            .matches("trust bundles from the SPIFFE Workload API changed")
            .count()
}

/// Waits until `proc` took in an update from the agent after the first `seen`.
async fn wait_for_update(proc: &Proc, seen: usize, what: &str) {
    wait_for(what, Duration::from_secs(30), || {
        let now = updates_taken(proc);
        async move { (now > seen).then_some(()) }
    })
    .await;
}

/// Federation on real SPIRE servers (spike.ist and other.td federate both ways, bundles set
/// with `spire-server bundle set`): a workload of other.td, with the SVID its own agent gives it,
/// reaches a Nexus whose SPIKE_TRUST_ROOT lists other.td (and is then authorised by policies
/// alone); a Nexus whose list does not name other.td refuses it at the handshake although its
/// agent delivers other.td's bundle. other.td's own superuser ID is a workload without access,
/// unless SPIKE_TRUST_ROOT_PILOT names other.td (then spike.ist's superuser is none). The
/// federated bundle replaced on the server (by a CA that did not sign the workload) and then
/// removed is followed without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_bundles_count_for_exactly_the_configured_trust_domains() {
    let Some(spire) = Spire::shared() else { return };
    let Some(other) = Spire::other() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    spire.set_federated_bundle(&other.trust_domain, &other.bundle_pem());
    other.set_federated_bundle(&spire.trust_domain, &spire.bundle_pem());
    let nexus_uid = fresh_uid();
    let fed = ["-federatesWith", &other.td_id()];
    let nexus_entry = spire.create_entry(nexus_uid, &spire.id("/spike/nexus"), &fed);
    let app = fresh_uid();
    let app_id = other.id("/app/fed");
    let app_entry = other.create_entry(app, &app_id, &["-federatesWith", &spire.td_id()]);
    // other.td may name a workload of its own superuser.
    let mimic = fresh_uid();
    let mimic_id = other.id("/spike/pilot/role/superuser");
    let mimic_entry = other.create_entry(mimic, &mimic_id, &["-federatesWith", &spire.td_id()]);
    spire.wait_for_svid(nexus_uid, &spire.id("/spike/nexus"));
    other.wait_for_svid(app, &app_id);
    other.wait_for_svid(mimic, &mimic_id);

    let mut c = AgentCluster::start(&spire, &keepers(&spire), &[]);
    let both = format!("{},{}", spire.trust_domain, other.trust_domain);
    c.start_nexus(&spire, nexus_uid, &[("SPIKE_TRUST_ROOT", &both)]);
    c.start_nexus(&spire, nexus_uid, &[]);
    // Operators from other.td only: SPIKE_TRUST_ROOT_PILOT names it.
    let pilots = [
        ("SPIKE_TRUST_ROOT", both.as_str()),
        ("SPIKE_TRUST_ROOT_PILOT", "other.td"),
    ];
    c.start_nexus(&spire, nexus_uid, &pilots);
    c.wait_ready().await;
    let (federating, narrow, pilots_abroad) = (&c.nexus[0], &c.nexus[1], &c.nexus[2]);
    // The narrow Nexus was handed other.td's bundle too, and set it aside.
    assert!(
        narrow.logs().contains(r#"ignored=["other.td"]"#),
        "{}",
        narrow.logs()
    );
    let su = spire.uid("superuser");
    let url = federating.base_url();
    let (code, _, err) = cli_as(&spire, su, &url, &["secret", "put", "fed/db", "k=v"]);
    assert_eq!(code, 0, "{err}");

    // The other.td workload runs `spike` with its own agent: it trusts spike.ist for Nexus.
    let other_td_runs = |uid: u32, url: &str, args: &[&str]| {
        let env = [
            ("SPIKE_TRUST_ROOT", other.trust_domain.as_str()),
            ("SPIKE_TRUST_ROOT_NEXUS", spire.trust_domain.as_str()),
            ("SPIKE_NEXUS_API_URL", url),
        ];
        run_as(&other, uid, args, &env)
    };
    let from_other_td = |url: &str| other_td_runs(app, url, &["secret", "get", "fed/db", "k"]);
    let (code, _, err) = from_other_td(&federating.base_url());
    assert_eq!(code, 1, "{err}\n{}", federating.logs());
    assert!(err.contains("access_unauthorized"), "{err}");
    // other.td's superuser ID: for this Nexus a workload like any other (SPIKE_TRUST_ROOT_PILOT
    // defaults to spike.ist), with no policy and so no access.
    for args in [
        &["secret", "put", "fed/db", "k=forged"][..],
        &["policy", "list"],
        &["secret", "get", "fed/db", "k"],
    ] {
        let (code, out, err) = other_td_runs(mimic, &federating.base_url(), args);
        assert_eq!(code, 1, "{args:?} as {mimic_id}: {out}{err}");
        assert!(err.contains("access_unauthorized"), "{args:?}: {err}");
    }
    // Where SPIKE_TRUST_ROOT_PILOT names other.td, it is the superuser, and spike.ist's is not.
    let (code, _, err) = other_td_runs(
        mimic,
        &pilots_abroad.base_url(),
        &["secret", "put", "fed/db", "k=v"],
    );
    assert_eq!(code, 0, "{err}\n{}", pilots_abroad.logs());
    let (code, _, err) = cli_as(
        &spire,
        su,
        &pilots_abroad.base_url(),
        &["secret", "get", "fed/db", "k"],
    );
    assert_eq!(
        code, 1,
        "spike.ist's superuser served where other.td holds the role: {err}"
    );
    assert!(err.contains("access_unauthorized"), "{err}");
    other.delete_entry(&mimic_entry);
    let pattern = format!("^{}$", app_id.replace('.', "\\."));
    let (code, _, err) = cli_as(
        &spire,
        su,
        &url,
        &[
            "policy",
            "create",
            "--name",
            "other-td",
            "--spiffeid-pattern",
            &pattern,
            "--path-pattern",
            "^fed/.*$",
            "--permissions",
            "read",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let served = || {
        let (code, out, err) = from_other_td(&federating.base_url());
        assert_eq!((code, out.trim()), (0, "v"), "{err}");
    };
    served();
    let refused_by = |n: &Proc| {
        let (code, out, err) = from_other_td(&n.base_url());
        assert_ne!(code, 0, "{} served other.td: {out}", n.name);
        assert!(out.trim().is_empty(), "{out}");
        assert!(
            !err.contains("access_unauthorized"),
            "not a TLS refusal: {err}"
        );
    };
    refused_by(narrow);
    // Refused for want of a bundle: the one the agent sent was not taken in.
    let no_bundle = format!("no trust bundle for trust domain other.td (peer {app_id})");
    assert!(narrow.logs().contains(&no_bundle), "{}", narrow.logs());

    // other.td's bundle replaced on the server by a CA that did not sign the workload (its
    // CA rolled over without the federation refreshing): refused, with no restart; the real
    // bundle back: served again.
    let seen = updates_taken(federating);
    spire.set_federated_bundle(&other.trust_domain, &spire.bundle_pem());
    wait_for_update(federating, seen, "the replaced other.td bundle").await;
    refused_by(federating);
    let seen = updates_taken(federating);
    spire.set_federated_bundle(&other.trust_domain, &other.bundle_pem());
    wait_for_update(federating, seen, "other.td's own bundle again").await;
    served();

    // The federation removed: refused, and the Nexus says why; spike.ist is served as before.
    spire.delete_federated_bundle(&other.trust_domain);
    wait_for(
        "Nexus notices other.td's bundle is gone",
        Duration::from_secs(30),
        || {
            let logs = federating.logs();
            async move { logs.contains("no trust bundle for other.td").then_some(()) }
        },
    )
    .await;
    refused_by(federating);
    for n in [federating, narrow] {
        let (code, out, err) = cli_as(&spire, su, &n.base_url(), &["secret", "get", "fed/db", "k"]);
        assert_eq!((code, out.trim()), (0, "v"), "{err}");
    }
    other.delete_entry(&app_entry);
    spire.delete_entry(&nexus_entry);
    other.delete_federated_bundle(&spire.trust_domain);
    assert!(!c.logs().contains("panicked"));
}

/// Bad identity sources on a real agent stop a server, and a client command, with a message
/// naming the cause and the variable: the SPIRE server's own API socket given as the Workload
/// API, a process the agent has no entry for, one registered as another role, and a trust
/// domain the agent has no bundle for (in SPIKE_TRUST_ROOT or in one role's variable). None of
/// them serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_that_cannot_give_a_usable_identity_is_named() {
    let Some(spire) = Spire::shared() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    let server_socket = format!("unix://{}", spire.server_socket.display());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let keeper = ["keeper"];
    let nexus = ["nexus"];
    let client = ["secret", "list"];
    /// (identity, command, environment, exit status, words the message must hold)
    type Case<'a> = (
        &'a str,
        &'a [&'a str],
        Vec<(&'a str, &'a str)>,
        i32,
        &'a [&'a str],
    );
    let cases: Vec<Case> = vec![
        (
            "keeper-1",
            &keeper,
            vec![("SPIFFE_ENDPOINT_SOCKET", &server_socket)],
            3,
            &[
                "SPIFFE_ENDPOINT_SOCKET",
                "does not serve the SPIFFE Workload API",
            ],
        ),
        (
            "superuser",
            &client,
            vec![("SPIFFE_ENDPOINT_SOCKET", &server_socket)],
            2,
            &[
                "SPIFFE_ENDPOINT_SOCKET",
                "does not serve the SPIFFE Workload API",
            ],
        ),
        (
            "unregistered",
            &keeper,
            vec![],
            3,
            &["no SVID for this process", "PermissionDenied"],
        ),
        // Registered, but as another role: the agent's SVID is not served as the wrong one.
        (
            "nexus",
            &keeper,
            vec![],
            1,
            &["spiffe://spike.ist/spike/nexus, which is not a keeper identity"],
        ),
        (
            "app-one",
            &nexus,
            vec![],
            1,
            &["spiffe://spike.ist/app/one, which is not a nexus identity"],
        ),
        (
            "keeper-1",
            &keeper,
            vec![("SPIKE_TRUST_ROOT", "spike.ist,absent.td")],
            3,
            &[
                "no trust bundle for absent.td",
                "SPIKE_TRUST_ROOT",
                "bundles for spike.ist",
            ],
        ),
        (
            "nexus",
            &nexus,
            vec![("SPIKE_TRUST_ROOT_KEEPER", "absent.td")],
            3,
            &["no trust bundle for absent.td (listed in SPIKE_TRUST_ROOT_KEEPER)"],
        ),
        (
            "superuser",
            &client,
            vec![("SPIKE_TRUST_ROOT_NEXUS", "absent.td")],
            2,
            &["no trust bundle for absent.td (listed in SPIKE_TRUST_ROOT_NEXUS)"],
        ),
    ];
    for (who, args, env, want_code, words) in cases {
        let mut all = vec![
            ("SPIKE_SPIFFE_SOURCE_TIMEOUT", "2s"),
            ("SPIKE_TRUST_ROOT", TD),
            ("SPIKE_KEEPER_TLS_PORT", "127.0.0.1:0"),
            ("SPIKE_NEXUS_TLS_PORT", "127.0.0.1:0"),
            (
                "SPIKE_NEXUS_KEEPER_PEERS",
                "https://127.0.0.1:1,https://127.0.0.1:2,https://127.0.0.1:3",
            ),
            ("SPIKE_NEXUS_DATA_DIR", data),
            ("SPIKE_NEXUS_API_URL", "https://127.0.0.1:1"),
        ];
        all.extend(env.iter().copied());
        let (code, out, err) = run_as(&spire, spire.uid(who), args, &all);
        let case = format!("{who} {args:?} {env:?}");
        assert_eq!(code, want_code, "{case}: {err}");
        for w in words {
            assert!(err.contains(w), "{case}: no {w:?} in: {err}");
        }
        assert!(out.is_empty(), "{case}: {out}");
        assert!(!err.contains("listening on"), "{case}: {err}");
    }
}

/// `spire-server localauthority x509 ARGS` on `spire`'s server: the authority ID it printed.
fn local_authority(spire: &Spire, args: &[&str]) -> String {
    let out = std::process::Command::new(&spire.server_bin)
        .args(["localauthority", "x509"])
        .args(args)
        .arg("-socketPath")
        .arg(&spire.server_socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "localauthority x509 {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Authority ID:"))
        .map(|id| id.trim().to_string())
        .unwrap_or_else(|| panic!("no authority ID in: {text}"))
}

/// The trust domain's CA rolls over as SPIRE operators do it, while Keepers, a Nexus and the
/// CLI serve requests: a new authority prepared (every process takes in the grown bundle),
/// activated, and the old one tainted (every process gets an SVID from the new CA at once). No
/// request fails, and a Nexus started afterwards reaches ready on Keepers whose SVIDs the new CA
/// signed. (The last step, `revoke`, only shrinks the bundle, as the federated bundle replaced
/// and removed in the test above does; here it would have to wait out SPIRE's own server and
/// agent SVID rotation, or the agent stops.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rollover_of_the_trust_domain_costs_no_request() {
    let Some(spire) = Spire::shared() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    let nexus = spire.uid("nexus");
    let mut c = AgentCluster::start(&spire, &keepers(&spire), &[nexus]);
    c.wait_ready().await;
    let urls = c.urls();
    let su = spire.uid("superuser");
    let mut sent = 0;
    let mut put = || {
        let (code, _, err) = cli_as(
            &spire,
            su,
            &urls,
            &["secret", "put", "ca/x", &format!("v={sent}")],
        );
        assert_eq!(code, 0, "request {sent} failed: {err}\n{}", c.logs());
        sent += 1;
    };
    put();
    let procs: Vec<&Proc> = c.keepers.iter().chain(c.nexus.iter()).collect();
    let seen = |f: fn(&Proc) -> usize| procs.iter().map(|p| f(p)).collect::<Vec<_>>();
    /// Sends requests until every process counted more by `f` than `before`.
    async fn until_all(
        procs: &[&Proc],
        f: fn(&Proc) -> usize,
        before: &[usize],
        what: &str,
        put: &mut dyn FnMut(),
    ) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Some((p, _)) = procs.iter().zip(before).find(|(p, b)| f(p) <= **b) {
            assert!(
                Instant::now() < deadline,
                "{} did not see {what}:\n{}",
                p.name,
                p.logs()
            );
            put();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let old = local_authority(&spire, &["show"]);

    let before = seen(updates_taken);
    let new = local_authority(&spire, &["prepare"]);
    assert_ne!(new, old);
    until_all(
        &procs,
        updates_taken,
        &before,
        "the prepared CA in the bundle",
        &mut put,
    )
    .await;

    local_authority(&spire, &["activate", "-authorityID", &new]);
    // Any SVID issued from now on comes from the new CA.
    let before = seen(svids_taken);
    // A superuser registered now gets an SVID from the new CA while Nexus still holds its
    // old-CA SVID: served only if Nexus took in the grown bundle that came without an SVID.
    let fresh = fresh_uid();
    let fresh_id = spire.id("/spike/pilot/role/superuser");
    let entry = spire.create_entry(fresh, &fresh_id, &[]);
    spire.wait_for_svid(fresh, &fresh_id);
    let (code, _, err) = cli_as(&spire, fresh, &urls, &["secret", "put", "ca/new", "v=1"]);
    assert_eq!(
        code,
        0,
        "a new-CA SVID before the rotation: {err}\n{}",
        c.logs()
    );
    spire.delete_entry(&entry);
    local_authority(&spire, &["taint", "-authorityID", &old]);
    until_all(
        &procs,
        svids_taken,
        &before,
        "an SVID from the new CA",
        &mut put,
    )
    .await;

    put();
    println!("{sent} requests across a CA rollover, none failed");

    // A Nexus started now loads the root key from Keepers that hold new-CA SVIDs only.
    c.start_nexus(&spire, nexus, &[]);
    fetch_bundle(&spire, &c.pki);
    c.wait_ready().await;
    let (code, out, err) = cli_as(
        &spire,
        su,
        &c.nexus[1].base_url(),
        &["secret", "get", "ca/x", "v"],
    );
    assert_eq!(
        (code, out.trim()),
        (0, (sent - 1).to_string().as_str()),
        "{err}"
    );
    assert!(!c.logs().contains("panicked"));
}

/// `/health` of `url` as `curl -k` reads it (a certificate that has expired must not keep the
/// answer from the test): (HTTP status, body).
fn health_insecure(url: &str) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-sk", "--max-time", "5", "-w", "\n%{http_code}"])
        .arg(format!("{url}/health"))
        .output()
        .expect("curl is installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The agent away until the Nexus SVID expires: `/health` answers 503 `svid_expired`, with the
/// agent's problem as the reason, rather than report ready behind a dead certificate. The agent
/// back: a new SVID, ready again, and requests served, with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_svid_that_expires_while_the_agent_is_away_is_reported_then_replaced() {
    let Some(spire) = Spire::shared() else { return };
    let _turn = ONE_AT_A_TIME.lock().await;
    let nexus_uid = fresh_uid();
    let nexus_id = spire.id("/spike/nexus");
    let entry = spire.create_entry(nexus_uid, &nexus_id, &["-x509SVIDTTL", "20"]);
    spire.wait_for_svid(nexus_uid, &nexus_id);
    let mut c = AgentCluster::start(&spire, &keepers(&spire), &[]);
    c.start_nexus(
        &spire,
        nexus_uid,
        &[("SPIKE_NEXUS_METRICS_ADDR", "127.0.0.1:0")],
    );
    c.wait_ready().await;
    let url = c.nexus[0].base_url();
    let su = spire.uid("superuser");
    let get = || cli_as(&spire, su, &c.urls(), &["secret", "list"]);
    assert_eq!(get().0, 0);
    // spike_nexus_svid_ready, as Prometheus would scrape it.
    let metrics = c.nexus[0]
        .logs()
        .split("serving metrics at ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .expect("Nexus logs its metrics address");
    let svid_ready = || {
        let out = std::process::Command::new("curl")
            .args(["-s", "--max-time", "5", &metrics])
            .output()
            .expect("curl is installed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("spike_nexus_svid_ready "))
            .map(|v| v.trim().to_string())
    };
    assert_eq!(svid_ready().as_deref(), Some("1"));

    let outage = spire.stop_agent();
    let body = wait_for(
        "/health to report the expired SVID",
        Duration::from_secs(60),
        || {
            let (code, body) = health_insecure(&url);
            async move { (code == 503 && body.contains("svid_expired")).then_some(body) }
        },
    )
    .await;
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "svid_expired", "{body}");
    assert_eq!(health["identity"], "svid_expired", "{body}");
    assert!(health["svid_expires"].is_string(), "{body}");
    let reason = health["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("does not exist") || reason.contains("connect"),
        "{body}"
    );
    wait_for("the metric to say so", Duration::from_secs(10), || {
        let v = svid_ready();
        async move { (v.as_deref() == Some("0")).then_some(()) }
    })
    .await;
    // The stream task says so at its next attempt to reach the agent.
    wait_for("Nexus logs the expiry", Duration::from_secs(30), || {
        let logs = c.nexus[0].logs();
        async move { logs.contains("has not replaced it").then_some(()) }
    })
    .await;

    outage.end();
    wait_for("ready again", Duration::from_secs(60), || {
        let (code, body) = health_insecure(&url);
        async move { (code == 200 && body.contains(r#""identity":"ready""#)).then_some(()) }
    })
    .await;
    let (code, _, err) = get();
    assert_eq!(code, 0, "{err}\n{}", c.logs());
    wait_for("the metric to recover", Duration::from_secs(10), || {
        let v = svid_ready();
        async move { (v.as_deref() == Some("1")).then_some(()) }
    })
    .await;
    spire.delete_entry(&entry);
    assert!(!c.logs().contains("panicked"));
}
