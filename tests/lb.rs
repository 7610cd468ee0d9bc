#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! Failover in front of and inside the client, with real processes on loopback:
//! - HAProxy and nginx running the configurations shipped under `packaging/`, in front of three
//!   Nexus instances on PostgreSQL, while the real `spike` CLI loops over puts and gets and one
//!   Nexus is SIGKILLed midway: no client operation may fail.
//! - A host name with several addresses, one of them dead; a URL list whose first entry is dead
//!   and whose second answers 503.
//!
//! HAProxy and nginx differ in what they notice. HAProxy checks `GET /health` over HTTPS every
//! second, so it takes a dead Nexus *and* a live but not ready one (503) out of rotation.
//! Open-source nginx has no active checks in its stream module: it only learns from failed
//! connections (passive checks), so a dead Nexus is skipped but a not-ready one is not, and the
//! client sees its 503 (and moves on if it has another URL).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use spike::client::nexus::NexusClient;
use spike::identity::{Role, SpiffeId};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Client operations per load-balancer run (each one `spike` process).
const OPS: usize = 150;
/// Concurrent client loops sharing those operations.
const WORKERS: usize = 3;

/// Waits until `addr` accepts connections, failing if `daemon` exits first.
fn wait_listening(daemon: &mut Process, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Some(status) = daemon.exited() {
            panic!("{} exited with {status}:\n{}", daemon.name, daemon.dump());
        }
        assert!(
            Instant::now() < deadline,
            "{} does not listen on {addr}:\n{}",
            daemon.name,
            daemon.dump()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Three Keepers, three Nexus instances on a fresh PostgreSQL database, all ready; and the
/// superuser's SVID directory.
async fn three_nexus() -> (Cluster, PathBuf) {
    let db = common::postgres::fresh_database().await;
    let mut c = Cluster::new(3);
    c.start_nexus_together(3, &pairs(&common::postgres::nexus_env(&db)));
    for n in &c.nexus {
        wait_status(&c.anonymous(), &n.url(), "ready").await;
    }
    let su = c.pki.issue("superuser", "/spike/pilot/role/superuser");
    (c, su)
}

fn cli_env<'a>(url: &'a str, svid: &'a Path) -> Vec<(&'a str, &'a str)> {
    let mut env = client_env(url, svid);
    // The client's failover decisions are debug lines on stderr; the loop counts them.
    env.push(("SPIKE_SYSTEM_LOG_LEVEL", "spike=debug"));
    env
}

/// Whether a command's stderr shows the client trying again after a failed attempt.
fn retried(stderr: &str) -> bool {
    stderr.contains("trying the next Nexus") || stderr.contains("may have reached it")
}

/// What a client loop did.
#[derive(Default)]
struct Tally {
    puts: usize,
    gets: usize,
    /// Operations that succeeded only after the client retried.
    retried: usize,
    /// Acknowledged writes: path -> value.
    acked: BTreeMap<String, String>,
    failures: Vec<String>,
}

impl Tally {
    /// Every operation ran and none failed, and every acknowledged write read back
    /// (`mismatches` lists those that did not); `context` explains a failure.
    fn assert_nothing_lost(&self, mismatches: &[String], context: impl Fn() -> String) {
        assert!(
            self.failures.is_empty(),
            "failed operations: {:#?}\n{}",
            self.failures,
            context()
        );
        assert_eq!(self.puts + self.gets, OPS);
        assert!(mismatches.is_empty(), "{mismatches:#?}\n{}", context());
    }
}

/// Runs [`OPS`] `spike secret put/get` commands through `url` on [`WORKERS`] threads;
/// `midway` runs once half of them are done, while the rest are in flight.
fn client_loop(url: &str, svid: &Path, tag: &str, midway: impl FnOnce()) -> Tally {
    let done = AtomicUsize::new(0);
    let tally = Mutex::new(Tally::default());
    std::thread::scope(|s| {
        for w in 0..WORKERS {
            let (done, tally) = (&done, &tally);
            s.spawn(move || {
                let env = cli_env(url, svid);
                let mut last: Option<(String, String)> = None;
                for i in 0..OPS / WORKERS {
                    // Even steps write a new path; odd steps read back the previous one.
                    match (i % 2, &last) {
                        (1, Some((path, value))) => {
                            let (code, out, err) = run_spike(&["secret", "get", path, "v"], &env);
                            let mut t = tally.lock().unwrap();
                            t.gets += 1;
                            t.retried += usize::from(code == 0 && retried(&err));
                            if code != 0 || out != *value {
                                t.failures.push(format!("get {path}: {code} {out:?} {err}"));
                            }
                        }
                        _ => {
                            let path = format!("lb/{tag}/w{w}/k{i}");
                            let value = format!("{tag}-{w}-{i}");
                            let arg = format!("v={value}");
                            let (code, _, err) = run_spike(&["secret", "put", &path, &arg], &env);
                            let mut t = tally.lock().unwrap();
                            t.puts += 1;
                            t.retried += usize::from(code == 0 && retried(&err));
                            if code == 0 {
                                t.acked.insert(path.clone(), value.clone());
                                last = Some((path, value));
                            } else {
                                t.failures.push(format!("put {path}: {code} {err}"));
                            }
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while done.load(Ordering::SeqCst) < OPS / 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        midway();
    });
    tally.into_inner().unwrap()
}

/// Reads every acknowledged write back through `url`; returns the mismatches.
fn verify(url: &str, svid: &Path, acked: &BTreeMap<String, String>) -> Vec<String> {
    let env = cli_env(url, svid);
    acked
        .iter()
        .filter_map(|(path, value)| {
            let (code, out, err) = run_spike(&["secret", "get", path, "v"], &env);
            (code != 0 || out != *value).then(|| format!("{path}: {code} {out:?} {err}"))
        })
        .collect()
}

/// `GET /stats;csv` from HAProxy's stats frontend: server name -> status (UP, DOWN, ...).
fn haproxy_status(stats: SocketAddr) -> HashMap<String, String> {
    let Ok(mut conn) = TcpStream::connect_timeout(&stats, Duration::from_secs(1)) else {
        return HashMap::new();
    };
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = conn.write_all(b"GET /stats;csv HTTP/1.0\r\nHost: stats\r\n\r\n");
    let mut text = String::new();
    let _ = conn.read_to_string(&mut text);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return HashMap::new();
    };
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    let mut lines = body.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or("")
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (Some(px), Some(sv), Some(st)) = (col("pxname"), col("svname"), col("status")) else {
        return HashMap::new();
    };
    lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.get(px) == Some(&"nexus") && f.len() > st)
        .map(|f| (f[sv].to_string(), f[st].to_string()))
        .collect()
}

/// The payload of a chunked HTTP/1.1 body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn wait_haproxy(stats: SocketAddr, server: &str, status: &str, lb: &Process) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = haproxy_status(stats);
        if all.get(server).is_some_and(|s| s.starts_with(status)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "HAProxy never reported {server} {status}: {all:?}\n{}",
            lb.dump()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_in_front_of_three_nexus_survives_a_killed_instance() {
    let (mut c, su) = three_nexus().await;
    let lb_addr: SocketAddr = format!("127.0.0.1:{}", unused_port()).parse().unwrap();
    let stats: SocketAddr = format!("127.0.0.1:{}", unused_port()).parse().unwrap();
    let mut cmd = Command::new("haproxy");
    cmd.args([
        "-db",
        "-f",
        &format!("{ROOT}/packaging/haproxy/spike-nexus.cfg"),
    ])
    .env("SPIKE_LB_BIND", lb_addr.to_string())
    .env("SPIKE_LB_STATS", stats.to_string())
    .env("SPIKE_LB_CA", c.pki.ca_pem());
    for (i, n) in c.nexus.iter().enumerate() {
        cmd.env(format!("SPIKE_NEXUS_{}", i + 1), n.addr.to_string());
    }
    let mut lb = Process::spawn("haproxy", c.dir.path(), &mut cmd, Stdout::Log);
    wait_listening(&mut lb, lb_addr);
    // The /health checks pass over verified HTTPS before any client traffic.
    for s in ["nexus1", "nexus2", "nexus3"] {
        wait_haproxy(stats, s, "UP", &lb);
    }

    let url = format!("https://{lb_addr}");
    let started = Instant::now();
    let mut killed_at = None;
    let tally = client_loop(&url, &su, "haproxy", || {
        c.nexus[1].kill();
        killed_at = Some(started.elapsed());
    });
    let elapsed = started.elapsed();
    wait_haproxy(stats, "nexus2", "DOWN", &lb);
    let marked_down = started.elapsed();
    let mismatches = verify(&url, &su, &tally.acked);
    println!(
        "haproxy: {} operations ({} puts, {} gets) through {url} in {:.1}s, nexus-2 SIGKILLed at \
         {:.1}s; {} failed, {} succeeded after a client retry; {} acknowledged writes, {} not read back; HAProxy status {:?} \
         (nexus2 DOWN by {:.1}s)",
        tally.puts + tally.gets,
        tally.puts,
        tally.gets,
        elapsed.as_secs_f64(),
        killed_at.unwrap().as_secs_f64(),
        tally.failures.len(),
        tally.retried,
        tally.acked.len(),
        mismatches.len(),
        haproxy_status(stats),
        marked_down.as_secs_f64(),
    );
    tally.assert_nothing_lost(&mismatches, || format!("{}{}", c.dump_logs(), lb.dump()));
}

/// The shipped nginx template with its `${VAR}` placeholders filled in.
fn render_nginx(vars: &[(&str, String)]) -> String {
    let mut text =
        std::fs::read_to_string(format!("{ROOT}/packaging/nginx/spike-nexus.conf")).unwrap();
    for (k, v) in vars {
        text = text.replace(&format!("${{{k}}}"), v);
    }
    // Only the comments may still name placeholders.
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        assert!(!line.contains("${"), "unfilled placeholder: {line}");
    }
    text
}

/// nginx has passive checks only: a killed Nexus refuses connections, nginx moves the
/// connection to another upstream (`proxy_next_upstream`) and avoids the dead one for
/// `fail_timeout`. It never asks `/health`, so a Nexus that is up but not ready would still
/// get traffic (the client sees its 503); this test kills one, which nginx does notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_in_front_of_three_nexus_survives_a_killed_instance() {
    let (mut c, su) = three_nexus().await;
    let lb_addr: SocketAddr = format!("127.0.0.1:{}", unused_port()).parse().unwrap();
    let dir = c.dir.path().join("nginx");
    std::fs::create_dir_all(&dir).unwrap();
    let mut vars = vec![
        ("SPIKE_LB_BIND", lb_addr.to_string()),
        ("SPIKE_LB_PID", dir.join("nginx.pid").display().to_string()),
        ("SPIKE_LB_LOG", dir.join("error.log").display().to_string()),
    ];
    let names = ["SPIKE_NEXUS_1", "SPIKE_NEXUS_2", "SPIKE_NEXUS_3"];
    for (name, n) in names.iter().zip(&c.nexus) {
        vars.push((name, n.addr.to_string()));
    }
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, render_nginx(&vars)).unwrap();
    let mut cmd = Command::new("nginx");
    cmd.arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(&dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .args(["-g", "daemon off;"]);
    let mut lb = Process::spawn("nginx", c.dir.path(), &mut cmd, Stdout::Log);
    wait_listening(&mut lb, lb_addr);

    let url = format!("https://{lb_addr}");
    let started = Instant::now();
    let mut killed_at = None;
    let tally = client_loop(&url, &su, "nginx", || {
        c.nexus[1].kill();
        killed_at = Some(started.elapsed());
    });
    let elapsed = started.elapsed();
    let mismatches = verify(&url, &su, &tally.acked);
    let errors = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
    let refused = errors.matches("Connection refused").count();
    println!(
        "nginx: {} operations ({} puts, {} gets) through {url} in {:.1}s, nexus-2 SIGKILLed at \
         {:.1}s; {} failed, {} succeeded after a client retry; {} acknowledged writes, {} not read back; {refused} refused \
         upstream connections logged by nginx (passed to the next upstream)",
        tally.puts + tally.gets,
        tally.puts,
        tally.gets,
        elapsed.as_secs_f64(),
        killed_at.unwrap().as_secs_f64(),
        tally.failures.len(),
        tally.retried,
        tally.acked.len(),
        mismatches.len(),
    );
    tally.assert_nothing_lost(&mismatches, || {
        format!("{}{}\n{errors}", c.dump_logs(), lb.dump())
    });
}

fn nexus_client(
    c: &Cluster,
    svid: &Path,
    urls: &[String],
    hosts: HashMap<String, Vec<IpAddr>>,
) -> NexusClient {
    let http = client(Some(svid), &c.pki, Role::Nexus).with_hosts(hosts);
    let caller = SpiffeId::parse(&format!("spiffe://{TD}/spike/pilot/role/superuser")).unwrap();
    NexusClient::new(
        http,
        urls.iter().map(|u| u.parse().unwrap()).collect(),
        caller,
    )
}

/// Counts audit lines for secret reads in a Nexus log.
fn reads_logged(p: &Proc) -> usize {
    p.logs()
        .lines()
        .filter(|l| l.contains("secret.get") && l.contains("lb/dns"))
        .count()
}

/// One name, two addresses (::1 and 127.0.0.1, same port), one Nexus on each: requests spread
/// over both; with the IPv6 one killed, every request still succeeds on the other.
///
/// No name on this machine resolves to several addresses (`localhost` is 127.0.0.1 only) and
/// `/etc/hosts` is not ours to edit, so the client's resolver is given the name's addresses
/// ([`spike::transport::HttpsClient::with_hosts`]); everything after resolution is the real path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_with_several_addresses_skips_the_dead_one() {
    let db = common::postgres::fresh_database().await;
    let mut c = Cluster::new(3);
    let backend = common::postgres::nexus_env(&db);
    let pg = pairs(&backend);
    let v4 = c.start_nexus(&pg);
    let port = c.nexus[v4].addr.port();
    let v6_listen = format!("[::1]:{port}");
    let mut v6_env = pg.clone();
    v6_env.push(("SPIKE_NEXUS_TLS_PORT", &v6_listen));
    let v6 = c.start_nexus(&v6_env);
    for n in &c.nexus {
        wait_status(&c.anonymous(), &n.url(), "ready").await;
    }
    let su = c.pki.issue("superuser", "/spike/pilot/role/superuser");
    let hosts: HashMap<String, Vec<IpAddr>> = [(
        "nexus.spike.test".to_string(),
        vec!["::1".parse().unwrap(), "127.0.0.1".parse().unwrap()],
    )]
    .into();
    let urls = [format!("https://nexus.spike.test:{port}")];
    let nexus = nexus_client(&c, &su, &urls, hosts);
    let value = BTreeMap::from([("v".to_string(), "x".to_string())]);
    nexus
        .secret_put("lb/dns", value.clone(), None)
        .await
        .unwrap();

    const READS: usize = 20;
    for _ in 0..READS {
        let got = nexus.secret_get("lb/dns", None).await.unwrap();
        assert_eq!(got.data, value);
    }
    let (on_v4, on_v6) = (reads_logged(&c.nexus[v4]), reads_logged(&c.nexus[v6]));
    println!(
        "both alive: {READS} reads, {on_v4} served on 127.0.0.1:{port}, {on_v6} on [::1]:{port}"
    );
    assert!(on_v4 > 0 && on_v6 > 0, "the random start spreads the reads");

    c.nexus[v6].kill();
    let started = Instant::now();
    for _ in 0..READS {
        let got = nexus.secret_get("lb/dns", None).await.unwrap();
        assert_eq!(got.data, value);
    }
    let v = nexus
        .secret_put("lb/dns", value.clone(), None)
        .await
        .unwrap();
    assert_eq!(v, 2);
    println!(
        "[::1]:{port} killed: {READS} reads and a put succeeded in {:.2}s",
        started.elapsed().as_secs_f64()
    );
}

/// `SPIKE_NEXUS_API_URL` with a dead URL, a Nexus that answers 503 (its Keepers are gone) and
/// a ready one: every command succeeds, whichever the random start picks first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_list_moves_past_dead_and_not_ready_instances() {
    let mut c = Cluster::new(3);
    let ready = c.start_nexus(&[]);
    let dead_keeper = format!("https://127.0.0.1:{}", unused_port());
    let other_data = c.dir.path().join("data-503");
    let not_ready = c.start_nexus(&[
        ("SPIKE_NEXUS_KEEPER_PEERS", &dead_keeper),
        ("SPIKE_NEXUS_SHAMIR_SHARES", "1"),
        ("SPIKE_NEXUS_SHAMIR_THRESHOLD", "1"),
        ("SPIKE_NEXUS_DATA_DIR", other_data.to_str().unwrap()),
    ]);
    wait_status(&c.anonymous(), &c.nexus[ready].url(), "ready").await;
    let (status, body) = health(&c.anonymous(), &c.nexus[not_ready].url())
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 503, "{body}");
    let su = c.pki.issue("superuser", "/spike/pilot/role/superuser");
    let list = [
        format!("https://127.0.0.1:{}", unused_port()),
        c.nexus[not_ready].url().to_string(),
        c.nexus[ready].url().to_string(),
    ]
    .map(|u| u.trim_end_matches('/').to_string())
    .join(",");
    let env = cli_env(&list, &su);
    let (code, _, err) = run_spike(&["secret", "put", "lb/list", "v=1"], &env);
    assert_eq!(code, 0, "{err}");
    for i in 0..10 {
        let started = Instant::now();
        let (code, out, err) = run_spike(&["secret", "get", "lb/list", "v"], &env);
        println!(
            "url list, get {i}: exit {code} in {:.2}s",
            started.elapsed().as_secs_f64()
        );
        assert_eq!((code, out.as_str()), (0, "1"), "{err}");
    }
}

/// A put carrying a `request_id`, sent once to one instance and again (as a client whose answer
/// was lost would) to another: one version, and both answers name it. A different id writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_replayed_through_another_instance_makes_one_version() {
    let db = common::postgres::fresh_database().await;
    let mut c = Cluster::new(3);
    let pg = common::postgres::nexus_env(&db);
    let (a, b) = (c.start_nexus(&pairs(&pg)), c.start_nexus(&pairs(&pg)));
    for n in &c.nexus {
        wait_status(&c.anonymous(), &n.url(), "ready").await;
    }
    let su = c.pki.issue("superuser", "/spike/pilot/role/superuser");
    let http = client(Some(&su), &c.pki, Role::Nexus);
    let put = |id: &str| {
        serde_json::to_vec(&serde_json::json!({
            "path": "lb/replay", "values": {"v": "once"}, "request_id": id
        }))
        .unwrap()
    };
    let id = spike::client::nexus::new_request_id();
    let mut versions = Vec::new();
    for n in [a, b, a] {
        let reply = http
            .post_json(&c.nexus[n].url(), SECRETS_PATH, put(&id))
            .await
            .unwrap();
        assert_eq!(reply.status.as_u16(), 200);
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        versions.push(body["version"].as_u64().unwrap());
    }
    let other = http
        .post_json(&c.nexus[b].url(), SECRETS_PATH, put("another-id"))
        .await
        .unwrap();
    let other: serde_json::Value = serde_json::from_slice(&other.body).unwrap();
    let nexus = nexus_client(&c, &su, &[c.nexus[b].url().to_string()], HashMap::new());
    let meta = nexus.secret_metadata("lb/replay", None).await.unwrap();
    println!(
        "request id {id} sent 3 times through 2 instances: versions {versions:?}; another id \
         made version {}; {} versions stored",
        other["version"],
        meta.versions.len()
    );
    assert_eq!(versions, vec![1, 1, 1]);
    assert_eq!(other["version"].as_u64(), Some(2));
    assert_eq!(meta.versions.len(), 2);
}
