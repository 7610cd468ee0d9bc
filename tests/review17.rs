#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! Review findings (review17) on real processes. These tests FAIL ON PURPOSE until the holes
//! they show are closed.
//!
//! Audit trail: whoever can edit the file but has no root key can change, add or remove
//! records and `spike audit verify` still exits 0, because a record with `"mac":null` (which
//! Nexus writes only before the root key is loaded) is accepted anywhere in a trail, and the
//! first line of a walk may be any record.

mod common;

use std::fs;

use common::*;
use hyper::StatusCode;
use serde_json::json;
use spike::protocol::audit::{self, Record};

/// `lines[from..]` rewritten without MACs, each record changed by `edit`, chained to the line
/// before it and numbered after it: what someone without the root key can produce.
fn forge_from(lines: &[String], from: usize, edit: impl Fn(&mut Record)) -> Vec<String> {
    let mut out: Vec<String> = lines[..from].to_vec();
    for l in &lines[from..] {
        let mut record = audit::parse(l).unwrap().record;
        edit(&mut record);
        if let Some(prev) = out.last() {
            record.prev = audit::hex(&audit::digest_of(prev));
            record.seq = audit::parse(prev).unwrap().record.seq + 1;
        }
        out.push(audit::line(&record, None));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_changed_or_removed_without_the_root_key_are_found() {
    let mut c = Cluster::new(3);
    let (file, n, url) = c.start_audited_nexus().await;
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    for path in ["apps/a", "apps/b", "apps/c", "apps/d"] {
        let (status, _) = call(
            &su,
            &url,
            SECRETS_PATH,
            json!({"path": path, "values": {"v": "x"}}),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    let shards = c.dir.path().join("recovery");
    c.export_recovery_shards(&c.nexus[n].base_url(), &shards);
    let (code, out, err) = audit_verify(&shards, &[&file]);
    assert_eq!(code, 0, "the untouched trail verifies: {out}{err}");

    let lines: Vec<String> = fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let k = lines
        .iter()
        .position(|l| l.contains("\"resource\":\"apps/b\""))
        .unwrap();
    assert!(lines[k].contains("\"mac\":\""), "apps/b's record has a MAC");

    // 1. apps/b and everything after it rewritten: other resources, another caller.
    let changed = forge_from(&lines, k, |r| {
        r.resource = r.resource.replace("apps/", "innocent/");
        if !r.caller.is_empty() {
            r.caller = "spiffe://spike.ist/app/someone-else".into();
        }
    });
    // 2. apps/b's record removed (the rest re-chained over the gap).
    let mut without = lines.clone();
    without.remove(k);
    let removed = forge_from(&without, k, |_| {});
    // 3. The first records cut off: the walk starts at apps/b.
    let head_cut = lines[k..].to_vec();
    // 4. The whole file replaced by a trail nobody wrote.
    let invented = forge_from(&lines, 0, |r| {
        r.resource = r.resource.replace("apps/", "invented/");
    });

    let mut accepted = Vec::new();
    for (name, forged) in [
        ("changed", &changed),
        ("removed", &removed),
        ("head-cut", &head_cut),
        ("invented", &invented),
    ] {
        let path = write_lines(&file, name, forged);
        let (code, out, err) = audit_verify(&shards, &[&path]);
        println!("{name}: exit {code}\n{out}{err}");
        if code == 0 {
            accepted.push(name);
        }
    }
    assert!(
        accepted.is_empty(),
        "`spike audit verify` exits 0 on trails edited without the root key: {accepted:?}"
    );
}

/// A SPIKE database whose `secrets` is a view over an endless recursive query: `spike migrate
/// from-spike` must refuse it (it is not SPIKE's schema), not spin forever in its first query.
#[test]
fn a_spike_database_with_an_endless_view_is_refused_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("hostile.db");
    let db = rusqlite::Connection::open(&db_path).unwrap();
    db.execute_batch(
        "CREATE VIEW secrets AS WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) \
           SELECT 'p' || n AS path, n AS version, x'00' AS nonce, x'00' AS encrypted_data, \
                  '' AS created_time, NULL AS deleted_time FROM r;
         CREATE TABLE secret_metadata (path, nonce, encrypted_current_version, \
           encrypted_oldest_version, encrypted_created_time, encrypted_updated_time, \
           encrypted_max_versions);
         CREATE TABLE policies (name, nonce, encrypted_spiffe_id_pattern, \
           encrypted_path_pattern, encrypted_permissions, created_time, updated_time);",
    )
    .unwrap();
    drop(db);
    let recover = dir.path().join("recover");
    let svid = dir.path().join("svid");
    fs::create_dir_all(&recover).unwrap();
    fs::create_dir_all(&svid).unwrap();
    let mut child = spike_command(
        &[
            "migrate",
            "from-spike",
            "--recover-dir",
            recover.to_str().unwrap(),
            db_path.to_str().unwrap(),
        ],
        &[
            ("SPIKE_SVID_DIR", svid.to_str().unwrap()),
            (
                "SPIKE_NEXUS_KEEPER_PEERS",
                "https://127.0.0.1:1,https://127.0.0.1:2,https://127.0.0.1:3",
            ),
        ],
    )
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > std::time::Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    println!("{status:?} after {:?}: {err}", started.elapsed());
    let status = status.expect("spike migrate was still running after 20 s on a 3-line database");
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("secrets"), "{err}");
}

/// A SIGHUP whose reopen fails (the path is, for the moment, a directory) leaves Nexus
/// refusing every request (fail-closed); once the path can be opened again Nexus must recover
/// by itself, as it does from a failed write, not wait for another SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopen_that_failed_is_retried() {
    let mut c = Cluster::new(3);
    let file = c.dir.path().join("audit.jsonl");
    let n = c.start_nexus(&[
        ("SPIKE_NEXUS_AUDIT_FILE", file.to_str().unwrap()),
        ("SPIKE_NEXUS_AUDIT_TIMEOUT", "1s"),
    ]);
    let url = c.nexus[n].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    let put = |path: &'static str| {
        let su = su.clone();
        let url = url.clone();
        async move {
            call(
                &su,
                &url,
                SECRETS_PATH,
                json!({"path": path, "values": {"v": "x"}}),
            )
            .await
            .0
        }
    };
    assert_eq!(put("apps/a").await, StatusCode::OK);

    fs::rename(&file, c.dir.path().join("audit.jsonl.1")).unwrap();
    fs::create_dir(&file).unwrap();
    c.nexus[n].signal("HUP");
    wait_status(&c.anonymous(), &url, "audit_unavailable").await;
    assert_eq!(put("apps/b").await, StatusCode::SERVICE_UNAVAILABLE);

    // The path can be opened again: Nexus must notice without another signal.
    fs::remove_dir(&file).unwrap();
    wait_status(&c.anonymous(), &url, "ready").await;
    assert_eq!(put("apps/c").await, StatusCode::OK);
    assert!(
        fs::read_to_string(&file).unwrap().contains("apps/c"),
        "the record went to the new file"
    );
}

/// A backup whose trailer matches (anyone can compute a SHA-256) but which holds a key no
/// store can take (a NUL character: PostgreSQL text refuses it) must be refused by `verify`
/// and `restore` before anything is written; restored into PostgreSQL it stopped half-way, and
/// "run the same restore again" can never finish it.
#[test]
fn a_crafted_backup_with_a_key_no_store_holds_is_refused() {
    use base64::Engine as _;
    let b64 = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
    let key_id = "00112233aabbccdd";
    let verifier = json!({"key_id": key_id, "sealed": b64(&[0; 60])}).to_string();
    let header = json!({
        "format": "spike-backup", "version": 1, "created": "2026-11-30T00:00:00Z",
        "backend": "sqlite", "consistency": "store", "key_id": key_id,
        "records": 3, "secrets": 2, "policies": 0, "system": 1,
    });
    let mut body = format!("{header}\n");
    for (ns, key, value) in [
        ("secrets", "apps/a", b"x".as_slice()),
        ("secrets", "apps/b\u{0}c", b"y".as_slice()),
        ("system", "root-key-verifier", verifier.as_bytes()),
    ] {
        body.push_str(&format!(
            "{}\n",
            json!({"ns": ns, "key": key, "value": b64(value)})
        ));
    }
    let sha = audit::hex(ring::digest::digest(&ring::digest::SHA256, body.as_bytes()).as_ref());
    body.push_str(&format!(
        "{}\n",
        json!({"end": "spike-backup", "records": 3, "sha256": sha})
    ));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("crafted.jsonl");
    fs::write(&file, body).unwrap();
    // Refused by the structure check, which needs no key (and comes before any MAC: a file
    // whose MAC verifies is still checked).
    let (code, out, err) = run_spike(
        &[
            "backup",
            "verify",
            file.to_str().unwrap(),
            "--structure-only",
        ],
        &[],
    );
    assert_ne!(code, 0, "a backup with a NUL in a key verifies: {out}{err}");
    assert!(err.contains("NUL"), "{err}");
    let data = dir.path().join("data");
    fs::create_dir_all(&data).unwrap();
    let (code, out, err) = run_spike(
        &[
            "backup",
            "restore",
            file.to_str().unwrap(),
            "--accept-unauthenticated",
        ],
        &[
            ("SPIKE_NEXUS_BACKEND_STORE", "sqlite"),
            ("SPIKE_NEXUS_DATA_DIR", data.to_str().unwrap()),
        ],
    );
    assert_ne!(code, 0, "a backup with a NUL in a key restores: {out}{err}");
    assert!(err.contains("NUL"), "{err}");
}

/// Paths may be 500 bytes long; the audit record must still say which secret a request named.
/// Two secrets whose paths share their first 256 characters were recorded with the same
/// truncated resource (`…`), so the trail could not tell which one was read or written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_record_names_a_long_path_whole() {
    let mut c = Cluster::new(3);
    let (file, _, url) = c.start_audited_nexus().await;
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    let stem = format!("apps/{}", "x".repeat(295));
    let paths = [format!("{stem}/first"), format!("{stem}/second")];
    for path in &paths {
        let (status, body) = call(
            &su,
            &url,
            SECRETS_PATH,
            json!({"path": path, "values": {"v": "x"}}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let resources: Vec<String> = fs::read_to_string(&file)
        .unwrap()
        .lines()
        .filter_map(|l| audit::parse(l).ok())
        .filter(|p| p.record.action == "secret.put")
        .map(|p| p.record.resource)
        .collect();
    assert_eq!(resources, paths, "the records name the paths");
}
