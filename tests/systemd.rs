#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! sd_notify against a real datagram socket: the message sequence, the watchdog withheld while
//! the store is down, and STOPPING=1 followed by a clean exit on SIGTERM. The watchdog's
//! cadence is checked in-process on a paused clock: measured at a receiver on a busy machine,
//! two pings can arrive closer together than they were sent.

mod common;

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Collects every datagram sent to a socket, in arrival order.
struct NotifySocket {
    path: std::path::PathBuf,
    got: Arc<Mutex<Vec<String>>>,
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
                    sink.lock().unwrap().push(msg);
                }
            }
        });
        NotifySocket { path, got }
    }

    fn texts(&self) -> Vec<String> {
        self.got.lock().unwrap().clone()
    }

    fn wait_for(&self, what: &str, pred: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pred(&self.texts()) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.texts()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn is_ping(msg: &str) -> bool {
    msg.lines().any(|l| l == "WATCHDOG=1")
}

fn pings(msgs: &[String]) -> usize {
    msgs.iter().filter(|m| is_ping(m)).count()
}

/// What the watchdog loop did, in order, at which (paused-clock) instant.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Event {
    Check(tokio::time::Instant),
    Ping(tokio::time::Instant),
}

/// The watchdog's schedule on a paused clock: a check every half interval exactly, a ping right
/// after each check that passed in time, none after a failed or a hung check, and no burst of
/// pings to catch up after a hung one.
#[tokio::test(start_paused = true)]
async fn watchdog_pings_every_half_interval_only_after_a_passing_check() {
    const HALF: Duration = Duration::from_millis(200);
    // What the next checks do: pass, fail, or hang past their deadline.
    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        Pass,
        Fail,
        Hang,
    }
    let mode = Arc::new(Mutex::new(Mode::Pass));
    let events = Arc::new(Mutex::new(Vec::new()));
    let watchdog = {
        let (mode, events, pinged) = (Arc::clone(&mode), Arc::clone(&events), Arc::clone(&events));
        tokio::spawn(spike::platform::systemd::watchdog_loop(
            HALF,
            move || {
                let (mode, events) = (Arc::clone(&mode), Arc::clone(&events));
                async move {
                    events
                        .lock()
                        .unwrap()
                        .push(Event::Check(tokio::time::Instant::now()));
                    let now = *mode.lock().unwrap();
                    match now {
                        Mode::Pass => true,
                        Mode::Fail => false,
                        Mode::Hang => {
                            tokio::time::sleep(HALF * 3).await;
                            true
                        }
                    }
                }
            },
            move || {
                pinged
                    .lock()
                    .unwrap()
                    .push(Event::Ping(tokio::time::Instant::now()))
            },
        ))
    };
    let start = tokio::time::Instant::now();
    // Modes change half-way between ticks (at 0.5, 5.5, 8.5, 10.5 half-intervals), so the
    // checks at ticks 0..=5 pass, 6..=8 fail, 9..=10 hang (each until the next tick, when its
    // deadline passes) and 11..=13 pass.
    let phase = |mode_now: Mode, ticks: u32| {
        let mode = Arc::clone(&mode);
        async move {
            *mode.lock().unwrap() = mode_now;
            tokio::time::sleep(HALF * ticks).await;
        }
    };
    tokio::time::sleep(HALF / 2).await;
    phase(Mode::Pass, 5).await;
    phase(Mode::Fail, 3).await;
    phase(Mode::Hang, 2).await;
    phase(Mode::Pass, 3).await;
    watchdog.abort();

    let at = |tick: u32| start + HALF * tick;
    let mut expected = Vec::new();
    for tick in 0..14 {
        expected.push(Event::Check(at(tick)));
        if !(6..=10).contains(&tick) {
            expected.push(Event::Ping(at(tick)));
        }
    }
    assert_eq!(*events.lock().unwrap(), expected);
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
        m.iter().any(|t| t.contains("READY=1")) && m.iter().any(|t| t.contains("STATUS=ready"))
    });
    sock.wait_for("five watchdog pings", |m| pings(m) >= 5);
    let texts = sock.texts();
    // READY comes first, once Nexus listens (its store may still be opening); every ping comes
    // after it, and the states follow.
    assert!(texts[0].contains("READY=1"), "{texts:?}");
    assert!(
        texts[0].contains("STATUS=opening the backing store"),
        "{texts:?}"
    );
    assert!(
        texts.iter().any(|t| t.contains("STATUS=awaiting keepers")),
        "{texts:?}"
    );
    // SIGTERM: STOPPING=1, then a clean exit.
    c.nexus[n].signal("TERM");
    sock.wait_for("STOPPING=1", |m| m.iter().any(|t| t.contains("STOPPING=1")));
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
            .any(|t| t.contains("READY=1") && t.contains("holding no shard"))
    });
    let n = c.start_nexus(&[]);
    wait_status(&c.anonymous(), &c.nexus[n].url(), "ready").await;
    sock.wait_for("holding shard 1", |m| {
        m.iter().any(|t| t.contains("STATUS=holding shard 1"))
    });
    // No WATCHDOG_USEC, no pings.
    assert_eq!(pings(&sock.texts()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_pings_stop_while_the_store_is_unreachable_and_resume_after() {
    let mut c = Cluster::new(3);
    let pg_parent = c.dir.path().join("pgparent");
    std::fs::create_dir_all(&pg_parent).unwrap();
    let pg = common::postgres::PgServer::start(&pg_parent);
    let sock = NotifySocket::bind(c.dir.path(), "notify-pg.sock");
    let backend = common::postgres::nexus_env(&pg.url);
    let mut env = pairs(&backend);
    env.extend([
        ("NOTIFY_SOCKET", sock.path.to_str().unwrap()),
        ("WATCHDOG_USEC", "600000"),
    ]);
    let n = c.start_nexus(&env);
    wait_status(&c.anonymous(), &c.nexus[n].url(), "ready").await;
    sock.wait_for("three pings while healthy", |m| pings(m) >= 3);

    pg.stop("immediate");
    // Every failed check says so in a status line (and sends no ping): after three of them,
    // no ping may have followed the first. Counted in messages, not in seconds.
    const FAILED: &str = "STATUS=store unavailable:";
    let failed = |m: &[String]| m.iter().filter(|t| t.contains(FAILED)).count();
    sock.wait_for("three failed checks", |m| failed(m) >= 3);
    let texts = sock.texts();
    let first = texts.iter().position(|t| t.contains(FAILED)).unwrap();
    assert_eq!(
        pings(&texts[first..]),
        0,
        "watchdog pinged while the store was down: {texts:?}"
    );
    assert!(
        c.nexus[n].is_running(),
        "Nexus must not exit when its store goes away"
    );

    pg.restart();
    let before = pings(&sock.texts());
    sock.wait_for("pings again after the store is back", |m| {
        pings(m) >= before + 2
    });
    let texts = sock.texts();
    println!(
        "{} notify messages, {} pings; {} failed checks in a row without a ping during the outage",
        texts.len(),
        pings(&texts),
        failed(&texts)
    );
}

/// A Keeper whose Workload API socket does not exist yet says why it waits in its sd_notify
/// STATUS (what `systemctl status` shows an operator), and sends no READY=1 meanwhile.
#[test]
fn a_server_waiting_for_the_agent_says_so_in_its_status() {
    let dir = tempfile::tempdir().unwrap();
    let sock = NotifySocket::bind(dir.path(), "keeper.sock");
    let missing = dir.path().join("agent.sock");
    let endpoint = format!("unix://{}", missing.display());
    let mut env = std::collections::HashMap::new();
    for (k, v) in [
        ("NOTIFY_SOCKET", sock.path.to_str().unwrap()),
        ("SPIFFE_ENDPOINT_SOCKET", endpoint.as_str()),
        ("SPIKE_SPIFFE_SOURCE_TIMEOUT", "60s"),
        ("SPIKE_KEEPER_TLS_PORT", "127.0.0.1:0"),
    ] {
        env.insert(k.to_string(), v.to_string());
    }
    let mut keeper = Proc::launch("keeper", dir.path(), &["keeper"], env);
    let waiting = format!(
        "STATUS=waiting for an SVID from the SPIFFE Workload API: socket {} does not exist",
        missing.display()
    );
    sock.wait_for("the waiting STATUS", |m| {
        m.iter().any(|t| t.contains(&waiting))
    });
    assert!(
        !sock.texts().iter().any(|t| t.contains("READY=1")),
        "{:?}",
        sock.texts()
    );
    keeper.kill();
}
