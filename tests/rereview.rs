#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! A second hostile review of issue 13's classes, with cases that are not in the issue text.
//! Each test here failed on b292ac0 (main when it was written) and shows a hole that is now
//! closed as a class: callers without a certificate no longer reach the operators' reserve,
//! an answer the caller never reads ends its connection at the write deadline, a deleted
//! policy book is not rebuilt from per-name rows unless an operator asks, the policy and
//! cipher routes are decided before their body, and validation errors never carry a
//! caller-supplied value unbounded.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use hyper::StatusCode;
use serde_json::json;
use spike::identity::Role;
use spike::protocol::nexus::{POLICY_PATH, SECRETS_PATH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// User plus system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which ends with ')'): utime is the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect(tls: &Arc<rustls::ClientConfig>, addr: std::net::SocketAddr) -> Option<Tls> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::clone(tls))
        .connect(name, tcp)
        .await
        .ok()
}

/// A flood of `count` connections with `tls` that pipeline `request` until the server stops
/// reading, then hold them without ever reading an answer, until `stop`. A connection the
/// server closes instead (it answers callers without a certificate once, without keep-alive)
/// is opened again at once, for as long as the flood lasts.
struct Flood {
    stop: Arc<AtomicBool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Flood {
    /// Starts the flood and returns once every connection has stalled or been closed by the
    /// server at least once.
    async fn start(
        tls: &Arc<rustls::ClientConfig>,
        addr: std::net::SocketAddr,
        count: usize,
        request: &'static [u8],
    ) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let settled = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..count {
            let (tls, stop, settled) = (Arc::clone(tls), Arc::clone(&stop), Arc::clone(&settled));
            tasks.spawn(async move {
                let mut counted = false;
                let mut closed = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    // Retry until a slot is free: a client's pooled connection holds one until
                    // the header deadline closes it.
                    let Some(mut s) = connect(&tls, addr).await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    let chunk = request.repeat(2000);
                    let mut sent = 0usize;
                    // Write until a write makes no progress for 2 s: the server stopped
                    // reading, because its own writes are blocked on a peer that never reads.
                    let stalled = loop {
                        let write =
                            tokio::time::timeout(Duration::from_secs(2), s.write_all(&chunk));
                        match write.await {
                            Ok(Ok(())) => sent += chunk.len(),
                            Ok(Err(e)) => {
                                if closed == 0 {
                                    println!("flood connection closed after {sent} bytes: {e}");
                                }
                                break false;
                            }
                            Err(_) => break true,
                        }
                        if sent > 256 << 20 {
                            println!("the server read 256 MiB without stalling");
                            return;
                        }
                    };
                    if !counted {
                        counted = true;
                        settled.fetch_add(1, Ordering::SeqCst);
                    }
                    if !stalled {
                        // Closed by the server: open another one at once.
                        closed += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    println!("flood connection stalled after {sent} bytes of requests");
                    // Hold it, never reading, until told to stop.
                    while !stop.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    drop(s);
                }
                if closed > 0 {
                    println!("flood task: {closed} connections closed by the server");
                }
            });
        }
        wait_for(
            "every flood connection to stall or be closed",
            Duration::from_secs(120),
            || {
                let settled = Arc::clone(&settled);
                async move { (settled.load(Ordering::SeqCst) >= count).then_some(()) }
            },
        )
        .await;
        Flood { stop, tasks }
    }

    async fn end(self) {
        self.stop.store(true, Ordering::SeqCst);
        join_all(self.tasks).await;
    }
}

/// Tries `path` with `body` as `client` every 200 ms for up to 20 s, until it answers `want`.
/// Returns how long the caller was locked out if it never got through, with the Nexus CPU time
/// of the last 10 s (near zero: the flood's connections are parked, not being served).
async fn locked_out(
    c: &Cluster,
    n: usize,
    client: &spike::transport::HttpsClient,
    path: &str,
    body: serde_json::Value,
    want: StatusCode,
) -> Option<String> {
    let url = c.nexus[n].url();
    let pid = c.nexus[n].pid();
    let started = Instant::now();
    let mut cpu_mid = None;
    let mut tries = 0;
    let served = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            tries += 1;
            let (s, b) = call(client, &url, path, body.clone()).await;
            if s == want {
                return;
            }
            assert_eq!(s, StatusCode::BAD_GATEWAY, "{b}");
            if cpu_mid.is_none() && started.elapsed() > Duration::from_secs(10) {
                cpu_mid = Some((cpu_ticks(pid), Instant::now()));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    if served.is_ok() {
        return None;
    }
    let (ticks, since) = cpu_mid.unwrap_or((0, started));
    Some(format!(
        "locked out for {:?} ({tries} tries) while Nexus used {} CPU ticks in its last {:?}; \
         last log line: {}",
        started.elapsed(),
        cpu_ticks(pid) - ticks,
        since.elapsed(),
        c.nexus[n].logs().lines().last().unwrap_or_default()
    ))
}

const SERVER_DEADLINES_2S: [(&str, &str); 3] = [
    ("SPIKE_HTTP_SERVER_READ_TIMEOUT", "2s"),
    ("SPIKE_HTTP_SERVER_READ_HEADER_TIMEOUT", "2s"),
    ("SPIKE_HTTP_SERVER_TLS_HANDSHAKE_TIMEOUT", "2s"),
];

/// Class 1 (slots): a caller with NO certificate is `privileged` (src/nexus/routes.rs,
/// `Handler for Api`), so it may take the reserved connections meant for operators; and with
/// the write stall of the next test it keeps them for good.
///
/// An anonymous caller opens `max + reserved` connections, pipelines `GET /health` on each
/// until the server stops reading, then holds them without reading. Expected: the superuser is
/// still served (the reserve is for operators), at the latest once the deadlines (2 s) have
/// passed. Observed on b292ac0: the superuser gets no connection for as long as the test waits
/// (20 s), while Nexus is idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_pipelined_callers_that_never_read_do_not_lock_out_the_superuser() {
    let mut c = Cluster::new(3);
    let mut env = vec![
        ("SPIKE_HTTP_SERVER_MAX_CONNECTIONS", "2"),
        ("SPIKE_HTTP_SERVER_RESERVED_CONNECTIONS", "2"),
        // Long enough that the write deadline (the next test's class) frees nothing while
        // this test waits: only keeping anonymous callers out of the reserve lets the
        // superuser through.
        ("SPIKE_HTTP_SERVER_WRITE_TIMEOUT", "120s"),
    ];
    env.extend(SERVER_DEADLINES_2S);
    let n = c.start_nexus(&env);
    let url = c.nexus[n].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    let put = json!({"path": "secrets/a", "values": {"v": "x"}});
    let (s, b) = call(&su, &url, SECRETS_PATH, put.clone()).await;
    assert_eq!(s, StatusCode::OK, "{b}");

    let anonymous = client_tls(None, &c.pki, Role::Nexus);
    let request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    let flood = Flood::start(&anonymous, c.nexus[n].addr, 4, request).await;
    let out = locked_out(&c, n, &su, SECRETS_PATH, put, StatusCode::OK).await;
    flood.end().await;
    assert!(
        out.is_none(),
        "the superuser, while 4 anonymous connections (cap 2 + 2 reserved) pipeline GET /health \
         and never read: {}",
        out.unwrap()
    );
}

/// Class 1 (deadlines): no deadline covers writing an answer. A caller that pipelines requests
/// and never reads stalls the server's write; hyper then neither reads the next request (so the
/// header deadline never starts) nor finishes the one in flight (there is no body to time out),
/// and the connection is held for as long as the caller likes — here by an identity that no
/// policy names (so not privileged: it holds the ordinary connections only).
///
/// Expected: once the deadlines (2 s) have passed, the workload that may read gets a
/// connection again. Observed on b292ac0: it is locked out for as long as the test waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_never_reads_its_answers_does_not_hold_a_connection_past_the_deadlines() {
    let mut c = Cluster::new(3);
    let mut env = vec![
        ("SPIKE_HTTP_SERVER_MAX_CONNECTIONS", "2"),
        ("SPIKE_HTTP_SERVER_RESERVED_CONNECTIONS", "2"),
    ];
    env.extend(SERVER_DEADLINES_2S);
    let n = c.start_nexus(&env);
    let url = c.nexus[n].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    let p = json!({"name": "web", "spiffeidPattern": "^spiffe://spike\\.ist/app/web$",
                   "pathPattern": "^secrets/web/.*$", "permissions": ["read"]});
    assert_eq!(call(&su, &url, POLICY_PATH, p).await.0, StatusCode::OK);
    let web = c.api_client("web", "/app/web");
    let get = "/v1/store/secrets?action=get";
    let none = json!({"path": "secrets/web/none"});
    assert_eq!(
        call(&web, &url, get, none.clone()).await.0,
        StatusCode::NOT_FOUND
    );

    let nobody = client_tls(
        Some(&c.pki.issue("nobody", "/app/nobody")),
        &c.pki,
        Role::Nexus,
    );
    // Any request with an answer will do (a refused one as well, but each of those writes
    // log lines): `/health`, asked by a caller who is not privileged.
    let request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    let flood = Flood::start(&nobody, c.nexus[n].addr, 2, request).await;
    let out = locked_out(&c, n, &web, get, none, StatusCode::NOT_FOUND).await;
    flood.end().await;
    assert!(
        out.is_none(),
        "a workload, while a no-policy identity holds both ordinary connections by pipelining \
         requests and never reading: {}",
        out.unwrap()
    );
}

/// Class 1/8 (authorise before the body): the policy routes' resource is fixed
/// (`spike/system/acl`), and so is the cipher's, so a caller can be refused from the handshake
/// and the route alone. A workload whose only policy grants `read` and `list` on its own
/// secrets passes the route-level check of `policy.get` / `policy.list`, and Nexus then reads
/// its whole body before refusing it on the ACL path (src/nexus/routes.rs, `dispatch` reads
/// the body, `policy_route` grants afterwards).
///
/// Expected: 401 while the body is still unsent (as for a caller no policy names).
/// Observed on b292ac0: the body is awaited until the body deadline (5 s here), then 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_without_acl_access_is_refused_a_policy_route_before_its_body() {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[("SPIKE_HTTP_SERVER_READ_TIMEOUT", "5s")]);
    let url = c.nexus[n].url();
    let addr = c.nexus[n].addr;
    wait_status(&c.anonymous(), &url, "ready").await;
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    let p = json!({"name": "web", "spiffeidPattern": "^spiffe://spike\\.ist/app/web$",
                   "pathPattern": "^secrets/web/.*$", "permissions": ["read", "list"]});
    assert_eq!(call(&su, &url, POLICY_PATH, p).await.0, StatusCode::OK);
    let web = client_tls(Some(&c.pki.issue("web", "/app/web")), &c.pki, Role::Nexus);

    for route in ["/v1/acl/policy?action=get", "/v1/acl/policy?action=list"] {
        let mut s = connect(&web, addr).await.expect("connects");
        let head = format!(
            "POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: 100000\r\n\r\n{{\"id\":\""
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.flush().await.unwrap();
        let started = Instant::now();
        let mut answer = [0u8; 64];
        let got = tokio::time::timeout(Duration::from_secs(15), s.read(&mut answer))
            .await
            .expect("an answer")
            .unwrap_or(0);
        let text = String::from_utf8_lossy(&answer[..got]).to_string();
        println!(
            "{route}: {:?} after {:?}",
            text.lines().next(),
            started.elapsed()
        );
        assert!(
            text.starts_with("HTTP/1.1 401") && started.elapsed() < Duration::from_secs(4),
            "{route}: a workload with no ACL access was not refused from its headers: got {:?} \
             after {:?} (the body deadline is 5 s)",
            text.lines().next(),
            started.elapsed()
        );
    }
}

/// The root key of the cluster, rebuilt from its Keepers' shards.
async fn root_key(c: &Cluster) -> spike::crypto::RootKey {
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

/// Class 4 (the store trusted too much), policy book: SECURITY.md says a store administrator
/// cannot "put back, edit or add a single policy", and that a book rollback is refused by an
/// instance that saw a later generation. But a book that is missing is re-created from
/// per-name policy rows (`migrate` in src/nexus/book.rs) by any instance that has not seen a
/// book since it started. A store administrator who kept a per-name row from before the
/// upgrade to the book (any subset of them, each from whatever time it was copied) deletes the
/// book, puts the row back, and waits for a Nexus restart: that one policy is in force again.
/// (The row here is sealed by the test with the root key: it stands for the copy kept from
/// before the upgrade, which is byte-for-byte what the earlier version wrote.)
///
/// Expected: the restarted instance does not grant from a replayed row (it refuses to migrate
/// unless an operator asks for it, or fails closed). Observed on b292ac0: the workload reads
/// the secret (200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_book_and_a_replayed_per_name_row_do_not_bring_back_a_policy() {
    use spike::nexus::policy::{Permission, StoredPolicy};
    use spike::store::Namespace;
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[]);
    let url = c.nexus[n].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    let w = c.api_client("w", "/app/w");
    let get = "/v1/store/secrets?action=get";
    let (s, b) = call(
        &su,
        &url,
        SECRETS_PATH,
        json!({"path": "secrets/w/1", "values": {"v": "x"}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(
        call(&w, &url, get, json!({"path": "secrets/w/1"})).await.0,
        StatusCode::UNAUTHORIZED,
        "no policy names w"
    );
    let key = root_key(&c).await.derive("spike/policies/v1");
    let old = StoredPolicy {
        name: "w".into(),
        spiffeid_pattern: "^spiffe://spike\\.ist/app/w$".into(),
        path_pattern: "^secrets/w/.*$".into(),
        permissions: vec![Permission::Read],
        created: 1_600_000_000_000_000_000,
        updated: 1_600_000_000_000_000_000,
    };
    let row = key
        .seal(
            format!("spike/policy/v1\0{}", old.name).as_bytes(),
            &serde_json::to_vec(&old).unwrap(),
        )
        .unwrap();

    // The store administrator: remove the book, put the kept row back.
    let db = rusqlite::Connection::open(c.data_dir.join("spike.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    db.execute(
        "DELETE FROM kv WHERE ns = ?1 AND key = 'policy-book'",
        [Namespace::System.as_str()],
    )
    .unwrap();
    let next: i64 = db
        .query_row(
            "UPDATE sequence SET value = value + 1 WHERE id = 1 RETURNING value",
            [],
            |r| r.get(0),
        )
        .unwrap();
    db.execute(
        "INSERT INTO kv (ns, key, value, revision) VALUES (?1, 'w', ?2, ?3)",
        (Namespace::Policies.as_str(), row, next),
    )
    .unwrap();
    drop(db);

    // The running instance saw a book and fails closed ...
    let (s, _) = call(&w, &url, get, json!({"path": "secrets/w/1"})).await;
    println!("running instance, book removed: {s}");
    // ... until it restarts.
    c.nexus[n].restart();
    wait_status(&c.anonymous(), &url, "ready").await;
    let (s, b) = call(&w, &url, get, json!({"path": "secrets/w/1"})).await;
    assert_ne!(
        s,
        StatusCode::OK,
        "a per-name row put back by the store administrator is in force after a restart: {b}\n{}",
        c.nexus[n]
            .logs()
            .lines()
            .filter(|l| l.contains("spike::nexus::book") || l.contains("spike::audit"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Class 3 (logs never hold a body): a policy put's permission names and path pattern go into
/// the "request refused" line (`invalid permission {p:?}` and `pathPattern {path:?} matches
/// the reserved path` in src/protocol/policy.rs `validate`). Debug quoting keeps them on one
/// line, but they are body content, and a permission name has no length limit: one request
/// writes up to `SPIKE_NEXUS_MAX_BODY_BYTES` (1 MiB) into one log line.
///
/// Expected: the log says which field is wrong, not what it held. Observed on b292ac0: the
/// marker and all 100,000 bytes after it are in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_policy_does_not_put_its_body_in_the_log() {
    const MARKER: &str = "BODY-MARKER-IN-A-PERMISSION";
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[("SPIKE_SYSTEM_LOG_FORMAT", "text")]);
    let url = c.nexus[n].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    let long = format!("{MARKER}{}", "x".repeat(100_000));
    let p = json!({"name": "p", "spiffeidPattern": "^spiffe://spike\\.ist/app/web$",
                   "pathPattern": "^secrets/web/.*$", "permissions": [long]});
    assert_eq!(
        call(&su, &url, POLICY_PATH, p).await.0,
        StatusCode::BAD_REQUEST
    );
    let logs = c.nexus[n].logs();
    let longest = logs.lines().map(str::len).max().unwrap_or(0);
    assert!(
        !logs.contains(MARKER),
        "a policy body reached the log (longest line {longest} bytes): {}",
        logs.lines()
            .find(|l| l.contains(MARKER))
            .map(|l| &l[..l.len().min(300)])
            .unwrap_or_default()
    );
}
