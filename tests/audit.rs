#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! The audit file (`SPIKE_NEXUS_AUDIT_FILE`) on real processes: one chained, MACed record per
//! request that `spike audit verify` checks with recovery shards; edits, removals and
//! reorderings found; SIGHUP reopens the file and kills no process; a full filesystem (a real
//! tmpfs) and a sink that blocks (a FIFO nobody reads) cost requests at most the timeout,
//! fail-closed (503, `/health` says why) or best-effort (served, `/health` says so).

mod common;

use std::fs;
use std::io::{BufRead, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use hyper::StatusCode;
use serde_json::{Value, json};

const SECRET_VALUE: &str = "audit-test-secret-value-3f9a";

fn records(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits (bounded) until `/health` reports the audit sink as `state`.
async fn wait_audit(
    anon: &spike::transport::HttpsClient,
    url: &hyper::Uri,
    state: &str,
    what: &str,
) {
    wait_for(what, Duration::from_secs(10), move || async move {
        let (_, body) = health(anon, url).await?;
        (body["audit"] == state).then_some(())
    })
    .await;
}

async fn put(client: &spike::transport::HttpsClient, url: &hyper::Uri, path: &str) -> StatusCode {
    call(
        client,
        url,
        SECRETS_PATH,
        json!({"path": path, "values": {"v": SECRET_VALUE}}),
    )
    .await
    .0
}

/// `POST /v1/store/secrets?action=VERB` naming `path`.
async fn on_path(
    client: &spike::transport::HttpsClient,
    url: &hyper::Uri,
    verb: &str,
    path: &str,
) -> (StatusCode, Value) {
    call(
        client,
        url,
        &action(SECRETS_PATH, verb),
        json!({"path": path}),
    )
    .await
}

async fn get(
    client: &spike::transport::HttpsClient,
    url: &hyper::Uri,
    path: &str,
) -> (StatusCode, Value) {
    on_path(client, url, "get", path).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_leaves_one_chained_record_and_edits_are_found() {
    let mut c = Cluster::new(3);
    let (file, n, url) = c.start_audited_nexus().await;
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    let stranger = c.api_client("stranger", "/app/stranger");
    assert_eq!(put(&su, &url, "apps/db").await, StatusCode::OK);
    assert_eq!(get(&su, &url, "apps/db").await.0, StatusCode::OK);
    assert_eq!(
        get(&stranger, &url, "apps/db").await.0,
        StatusCode::UNAUTHORIZED
    );
    // An action no route has: refused, and recorded with the path it named.
    assert_eq!(
        on_path(&su, &url, "bogus", "apps/db").await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(get(&su, &url, "apps/none").await.0, StatusCode::NOT_FOUND);

    let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "audit file mode");
    let text = fs::read_to_string(&file).unwrap();
    assert!(!text.contains(SECRET_VALUE), "a value in the audit file");
    let all = records(&file);
    assert_eq!(all[0]["kind"], "open", "{text}");
    let requests: Vec<&Value> = all.iter().filter(|r| r["kind"] == "request").collect();
    let seen: Vec<(String, String, String, u64)> = requests
        .iter()
        .map(|r| {
            (
                r["caller"].as_str().unwrap().to_string(),
                r["action"].as_str().unwrap().to_string(),
                r["resource"].as_str().unwrap_or_default().to_string(),
                r["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let su_id = "spiffe://spike.ist/spike/pilot/role/superuser";
    assert_eq!(
        seen,
        vec![
            (su_id.into(), "secret.put".into(), "apps/db".into(), 200),
            (su_id.into(), "secret.get".into(), "apps/db".into(), 200),
            // Refused before its body was read: no resource.
            (
                "spiffe://spike.ist/app/stranger".into(),
                "secret.get".into(),
                String::new(),
                401
            ),
            (su_id.into(), "none".into(), SECRETS_PATH.into(), 400),
            (su_id.into(), "secret.get".into(), "apps/none".into(), 404),
        ],
        "{text}"
    );
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r["seq"].as_u64(), Some(i as u64 + 1), "{text}");
    }
    for r in &requests {
        assert!(r["mac"].is_string() && r["key_id"].is_string(), "{r}");
        let id = r["request_id"].as_str().unwrap();
        assert!(
            c.nexus[n].logs().contains(&format!("request_id={id}")),
            "the stderr audit line names the same request id {id}"
        );
    }

    let shards = c.dir.path().join("recovery");
    c.export_recovery_shards(&c.nexus[n].base_url(), &shards);
    let (code, out, err) = audit_verify(&shards, &[&file]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("records verified"), "{out}");

    // Every kind of edit is found, at the record where the chain breaks.
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    // The superuser's read: a request record with records after it.
    let k = lines
        .iter()
        .position(|l| l.contains("\"secret.get\"") && l.contains("\"status\":200"))
        .unwrap();
    let mut edited = lines.clone();
    edited[k] = edited[k].replace("apps/db", "apps/dc");
    let mut removed = lines.clone();
    removed.remove(k);
    let mut swapped = lines.clone();
    swapped.swap(k, k + 1);
    let mut last_changed = lines.clone();
    let last = last_changed.len() - 1;
    last_changed[last] = last_changed[last].replace("404", "200");
    let mut status_only = lines.clone();
    status_only[k] = status_only[k].replace("\"status\":200", "\"status\":201");
    for (name, lines, broken_at) in [
        ("edited", &edited, k + 1),
        ("removed", &removed, k + 1),
        ("swapped", &swapped, k + 1),
        ("last-changed", &last_changed, last + 1),
        ("status-changed", &status_only, k + 1),
    ] {
        let path = write_lines(&file, name, lines);
        let (code, out, err) = audit_verify(&shards, &[&path]);
        assert_eq!(code, 1, "{name} was not found: {out}{err}");
        assert!(
            err.contains(&format!("{}:{broken_at}", path.display()))
                && err.contains("first broken"),
            "{name}: {err}"
        );
    }
    // Another deployment's shards: said, not mistaken for an edit.
    let other = c.dir.path().join("other-shards");
    fs::create_dir_all(&other).unwrap();
    fs::write(
        other.join("spike.recovery.1.txt"),
        format!("spike:1:{}", "11".repeat(32)),
    )
    .unwrap();
    fs::write(
        other.join("spike.recovery.2.txt"),
        format!("spike:2:{}", "35".repeat(32)),
    )
    .unwrap();
    let (code, _, err) = audit_verify(&other, &[&file]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("written under root key"), "{err}");
    assert!(!c.dump_logs().contains(SECRET_VALUE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reopens_the_file_the_chain_continues_and_no_process_dies() {
    let mut c = Cluster::new(3);
    let (file, n, url) = c.start_audited_nexus().await;
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    assert_eq!(put(&su, &url, "apps/a").await, StatusCode::OK);

    // logrotate, twice: move the file, signal, and the next records go to a new file.
    let oldest = c.dir.path().join("audit.jsonl.2");
    let rotated = c.dir.path().join("audit.jsonl.1");
    for (moved_to, path) in [(&oldest, "apps/b"), (&rotated, "apps/c")] {
        fs::rename(&file, moved_to).unwrap();
        c.nexus[n].signal("HUP");
        c.keepers[0].signal("HUP");
        wait_for(
            "a new audit file after SIGHUP",
            Duration::from_secs(10),
            || {
                let exists = file.exists();
                async move { exists.then_some(()) }
            },
        )
        .await;
        assert_eq!(put(&su, &url, path).await, StatusCode::OK);
    }
    assert!(c.nexus[n].is_running(), "Nexus died of SIGHUP");
    assert!(c.keepers[0].is_running(), "a Keeper died of SIGHUP");
    let fresh = records(&file);
    assert_eq!(fresh[0]["kind"], "open");
    assert_eq!(fresh[0]["detail"], "reopen");
    assert!(fresh.iter().any(|r| r["resource"] == "apps/c"));
    assert!(records(&rotated).iter().any(|r| r["resource"] == "apps/b"));
    assert!(!records(&rotated).iter().any(|r| r["resource"] == "apps/c"));
    assert_eq!(
        fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let shards = c.dir.path().join("recovery");
    c.export_recovery_shards(&c.nexus[n].base_url(), &shards);
    let (code, out, err) = audit_verify(&shards, &[&oldest, &rotated, &file]);
    assert_eq!(code, 0, "{out}{err}");
    // A missing file in the middle, or the files out of order, break the chain.
    let (code, _, err) = audit_verify(&shards, &[&oldest, &file]);
    assert_eq!(code, 1, "a missing file was not found");
    assert!(err.contains(&format!("{}:1", file.display())), "{err}");
    let (code, _, err) = audit_verify(&shards, &[&oldest, &file, &rotated]);
    assert_eq!(code, 1, "files out of order were not found: {err}");
    // A client command survives SIGHUP too: `spike secret get` of a Nexus that does not
    // answer is still running when the signal comes.
    let svid = c.pki.issue("su2", "/spike/pilot/role/superuser");
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("https://{}", silent.local_addr().unwrap());
    let mut cli = spike_command(
        &["secret", "get", "apps/a"],
        &client_env(&silent_url, &svid),
    )
    .spawn()
    .unwrap();
    silent.set_nonblocking(true).unwrap();
    // Held open (and never answered) until the signal has been delivered.
    let _held = wait_for("the client to connect", Duration::from_secs(10), || {
        let accepted = silent.accept().ok().map(|(stream, _)| stream);
        async move { accepted }
    })
    .await;
    signal(cli.id(), "HUP");
    let status = cli.wait().unwrap();
    assert_ne!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(1),
        "a client command died of SIGHUP"
    );

    // A restarted Nexus continues the chain of the file it finds.
    c.nexus[n].restart();
    c.nexus[n].wait_listening();
    wait_status(&c.anonymous(), &c.nexus[n].url(), "ready").await;
    assert_eq!(put(&su, &c.nexus[n].url(), "apps/d").await, StatusCode::OK);
    let (code, out, err) = audit_verify(&shards, &[&oldest, &rotated, &file]);
    assert_eq!(code, 0, "{out}{err}");
}

/// A small tmpfs the test mounts (and unmounts on drop).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs (the full-disk tests need root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }

    /// Fills the filesystem with a file `filler` until it is full.
    fn fill(&self) -> PathBuf {
        let filler = self.0.join("filler");
        let mut f = fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        for _ in 0..100_000 {
            if f.write_all(&block).is_err() {
                break;
            }
        }
        let _ = f.write_all(&[0u8; 1]);
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

async fn full_disk(mode: &str) {
    let mut c = Cluster::new(3);
    let mnt = Tmpfs::new(&c.dir.path().join("mnt"), "256k");
    let file = mnt.0.join("audit.jsonl");
    let n = c.start_nexus(&[
        ("SPIKE_NEXUS_AUDIT_FILE", file.to_str().unwrap()),
        ("SPIKE_NEXUS_AUDIT_MODE", mode),
        ("SPIKE_NEXUS_AUDIT_TIMEOUT", "500ms"),
    ]);
    let url = c.nexus[n].url();
    let anon = c.anonymous();
    wait_status(&anon, &url, "ready").await;
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    assert_eq!(put(&su, &url, "apps/db").await, StatusCode::OK);

    let filler = mnt.fill();
    // Enough requests that their records cannot fit in what is left of the last page.
    let mut statuses = Vec::new();
    for _ in 0..40 {
        statuses.push(get(&su, &url, "apps/db").await);
    }
    let now = health(&anon, &url).await.unwrap();
    if mode == "fail-closed" {
        let (s, body) = statuses.last().unwrap();
        assert_eq!(*s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["err"], "audit_unavailable");
        assert_eq!(now.0, StatusCode::SERVICE_UNAVAILABLE, "{}", now.1);
        assert_eq!(now.1["status"], "audit_unavailable");
        assert_eq!(now.1["audit"], "failing");
        assert!(
            now.1["reason"].as_str().unwrap().contains("No space left"),
            "{}",
            now.1
        );
    } else {
        assert!(
            statuses.iter().all(|(s, _)| *s == StatusCode::OK),
            "best-effort refused a request: {statuses:?}"
        );
        assert_eq!(now.0, StatusCode::OK, "{}", now.1);
        assert_eq!(now.1["audit"], "failing");
    }

    // Space again: the sink recovers by itself and the file is one unbroken chain.
    fs::remove_file(&filler).unwrap();
    wait_status(&anon, &url, "ready").await;
    wait_audit(&anon, &url, "ok", "the audit sink to recover").await;
    assert_eq!(get(&su, &url, "apps/db").await.0, StatusCode::OK);
    let shards = c.dir.path().join("recovery");
    c.export_recovery_shards(&c.nexus[n].base_url(), &shards);
    let (code, out, err) = audit_verify(&shards, &[&file]);
    assert_eq!(code, 0, "{out}{err}");
    let gets = records(&file)
        .iter()
        .filter(|r| r["action"] == "secret.get")
        .count();
    if mode == "best-effort" {
        // Every record was kept and written once there was room.
        assert!(gets >= 41, "{gets} get records");
    }
    assert!(c.nexus[n].logs().contains("audit trail write failed"));
    assert!(!c.dump_logs().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_closed_and_recovers() {
    full_disk("fail-closed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_best_effort_keeps_serving_and_loses_nothing() {
    full_disk("best-effort").await;
}

async fn blocked_sink(mode: &str) {
    let mut c = Cluster::new(3);
    let file = c.dir.path().join("audit.jsonl");
    let n = c.start_nexus(&[
        ("SPIKE_NEXUS_AUDIT_FILE", file.to_str().unwrap()),
        ("SPIKE_NEXUS_AUDIT_MODE", mode),
        ("SPIKE_NEXUS_AUDIT_TIMEOUT", "500ms"),
    ]);
    let url = c.nexus[n].url();
    let anon = c.anonymous();
    wait_status(&anon, &url, "ready").await;
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    assert_eq!(put(&su, &url, "apps/db").await, StatusCode::OK);

    // The file becomes a FIFO that nobody reads: reopening it blocks, as a hung mount would.
    fs::remove_file(&file).unwrap();
    let made = Command::new("mkfifo").arg(&file).status().unwrap();
    assert!(made.success());
    c.nexus[n].signal("HUP");
    wait_audit(&anon, &url, "blocked", "the sink to count as blocked").await;
    let started = Instant::now();
    let (s, body) = get(&su, &url, "apps/db").await;
    let waited = started.elapsed();
    println!("{mode}: a request with the sink blocked was answered {s} after {waited:?}");
    let (hs, hbody) = health(&anon, &url).await.unwrap();
    if mode == "fail-closed" {
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["err"], "audit_unavailable");
        assert_eq!(hs, StatusCode::SERVICE_UNAVAILABLE, "{hbody}");
        assert_eq!(hbody["status"], "audit_unavailable");
    } else {
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(hs, StatusCode::OK, "{hbody}");
    }
    // The superuser is not locked out of /health or the process: it still answers, and when
    // the sink moves again so does Nexus.
    let reader = std::thread::spawn({
        let file = file.clone();
        move || {
            let f = fs::File::open(&file).unwrap();
            std::io::BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .take_while(|l| !l.contains("apps/unblocked"))
                .count()
        }
    });
    wait_audit(&anon, &url, "ok", "the sink to write again").await;
    assert_eq!(put(&su, &url, "apps/unblocked").await, StatusCode::OK);
    let lines_before = reader.join().unwrap();
    assert!(lines_before >= 1, "the FIFO reader saw the reopen record");
    assert!(!c.dump_logs().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_sink_fails_closed_within_the_timeout() {
    blocked_sink("fail-closed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_sink_best_effort_keeps_serving() {
    blocked_sink("best-effort").await;
}

#[test]
fn bad_audit_settings_are_refused_at_start() {
    let c = Cluster::new(1);
    for (i, (var, value, says)) in [
        (
            "SPIKE_NEXUS_AUDIT_MODE",
            "sometimes",
            "SPIKE_NEXUS_AUDIT_MODE",
        ),
        ("SPIKE_NEXUS_AUDIT_FILE", "relative/audit.jsonl", "absolute"),
        (
            "SPIKE_NEXUS_AUDIT_TIMEOUT",
            "0s",
            "SPIKE_NEXUS_AUDIT_TIMEOUT",
        ),
        (
            "SPIKE_NEXUS_AUDIT_FILE",
            "/nonexistent-dir/audit.jsonl",
            "cannot open the audit file",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let mut nexus = Proc::launch(
            &format!("bad-{i}"),
            c.dir.path(),
            &["nexus"],
            c.nexus_env(&[(var, value), ("SPIKE_NEXUS_SHAMIR_THRESHOLD", "1")]),
        );
        let code = nexus.wait_exit(Duration::from_secs(20));
        assert!(matches!(code, Some(c) if c != 0), "{var}={value}: {code:?}");
        let err = nexus.logs();
        assert!(err.contains(says), "{var}={value}: {err}");
    }
}
