#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! sd_notify against a real datagram socket: the message sequence, the watchdog cadence, and
//! STOPPING=1 followed by a clean exit on SIGTERM.

mod common;

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Collects every datagram sent to a socket, with its arrival time.
struct NotifySocket {
    path: std::path::PathBuf,
    got: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl NotifySocket {
    fn bind(dir: &std::path::Path, name: &str) -> NotifySocket {
        let path = dir.join(name);
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&got);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let deadline = Instant::now() + Duration::from_secs(120);
            while Instant::now() < deadline {
                if let Ok(n) = sock.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    sink.lock().unwrap().push((Instant::now(), msg));
                }
            }
        });
        NotifySocket { path, got }
    }

    fn messages(&self) -> Vec<(Instant, String)> {
        self.got.lock().unwrap().clone()
    }

    fn wait_for(&self, what: &str, pred: impl Fn(&[(Instant, String)]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pred(&self.messages()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.texts()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn texts(&self) -> Vec<String> {
        self.messages().into_iter().map(|(_, m)| m).collect()
    }
}

fn pings(msgs: &[(Instant, String)]) -> Vec<Instant> {
    msgs.iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(t, _)| *t)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nexus_reports_ready_status_and_pings_the_watchdog() {
    let mut c = Cluster::new(3);
    let sock = NotifySocket::bind(c.dir.path(), "notify.sock");
    let n = c.start_nexus(&[
        ("NOTIFY_SOCKET", sock.path.to_str().unwrap()),
        ("WATCHDOG_USEC", "400000"),
    ]);
    wait_status(&c.anonymous(), &c.nexus[n].url(), "ready").await;
    sock.wait_for("READY=1 and status ready", |m| {
        m.iter().any(|(_, t)| t.contains("READY=1"))
            && m.iter().any(|(_, t)| t.contains("STATUS=ready"))
    });
    sock.wait_for("five watchdog pings", |m| pings(m).len() >= 5);
    let texts = sock.texts();
    // READY comes first, with the state Nexus starts in.
    assert!(texts[0].contains("READY=1"), "{texts:?}");
    assert!(texts[0].contains("STATUS=awaiting keepers"), "{texts:?}");
    // Pings come at half the watchdog interval: never faster (a delayed tick only makes the
    // gap longer, so this holds on a slow machine too).
    let p = pings(&sock.messages());
    for pair in p.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(150),
            "pings too close: {:?}",
            pair[1] - pair[0]
        );
    }
    // SIGTERM: STOPPING=1, then a clean exit.
    let pid = c.nexus[n].pid();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    sock.wait_for("STOPPING=1", |m| {
        m.iter().any(|(_, t)| t.contains("STOPPING=1"))
    });
    let code = c.nexus[n].wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{}", c.nexus[n].logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeper_reports_ready_and_its_shard() {
    let mut c = Cluster::new(3);
    // Restart Keeper 1 with a notify socket, then let a Nexus fill it.
    let sock = NotifySocket::bind(c.dir.path(), "keeper.sock");
    c.keepers[0].set_env("NOTIFY_SOCKET", sock.path.to_str().unwrap());
    c.keepers[0].restart();
    sock.wait_for("READY=1", |m| {
        m.iter()
            .any(|(_, t)| t.contains("READY=1") && t.contains("holding no shard"))
    });
    let n = c.start_nexus(&[]);
    wait_status(&c.anonymous(), &c.nexus[n].url(), "ready").await;
    sock.wait_for("holding shard 1", |m| {
        m.iter().any(|(_, t)| t.contains("STATUS=holding shard 1"))
    });
    // No WATCHDOG_USEC, no pings.
    assert!(pings(&sock.messages()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_pings_stop_while_the_store_is_unreachable_and_resume_after() {
    let mut c = Cluster::new(3);
    let pg_parent = c.dir.path().join("pgparent");
    std::fs::create_dir_all(&pg_parent).unwrap();
    let pg = common::postgres::PgServer::start(&pg_parent);
    let sock = NotifySocket::bind(c.dir.path(), "notify-pg.sock");
    let n = c.start_nexus(&[
        ("SPIKE_NEXUS_BACKEND_STORE", "postgres"),
        ("SPIKE_NEXUS_DB_URL", &pg.url),
        ("NOTIFY_SOCKET", sock.path.to_str().unwrap()),
        ("WATCHDOG_USEC", "600000"),
    ]);
    wait_status(&c.anonymous(), &c.nexus[n].url(), "ready").await;
    sock.wait_for("three pings while healthy", |m| pings(m).len() >= 3);

    pg.stop("immediate");
    // Once the failure is seen (a status line says so), no ping follows it.
    sock.wait_for("store unavailable status", |m| {
        m.iter()
            .any(|(_, t)| t.contains("STATUS=store unavailable"))
    });
    let seen_at = sock
        .messages()
        .iter()
        .find(|(_, t)| t.contains("STATUS=store unavailable"))
        .map(|(t, _)| *t)
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let during = pings(&sock.messages())
        .into_iter()
        .filter(|t| *t > seen_at)
        .count();
    assert_eq!(
        during,
        0,
        "watchdog pinged while the store was down: {:?}",
        sock.texts()
    );
    assert!(
        c.nexus[n].is_running(),
        "Nexus must not exit when its store goes away"
    );

    pg.restart();
    let before = pings(&sock.messages()).len();
    sock.wait_for("pings again after the store is back", |m| {
        pings(m).len() >= before + 2
    });
    println!(
        "{} notify messages, {} pings; none for 2 s of store outage",
        sock.messages().len(),
        pings(&sock.messages()).len()
    );
}
