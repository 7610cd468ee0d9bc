#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! SPIKE's own Go SDK (github.com/spiffe/spike-sdk-go v0.19.9, the version SPIKE main requires)
//! against a real `spike nexus` (issue 15): tests/go/sdk calls every client operation the SDK
//! offers and checks each answer. The SDK takes its identity from a real SPIRE agent's Workload
//! API, as SPIKE's Pilot does; Nexus and the Keepers serve SVIDs from the same SPIRE.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::spire::Spire;
use common::*;

/// Builds the conformance client from its pinned module (Go's build cache makes reruns fast).
fn sdk_client() -> PathBuf {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sdk-conformance");
    let status = Command::new("go")
        .args(["build", "-mod=readonly", "-trimpath", "-o"])
        .arg(&out)
        .arg(".")
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/go/sdk"))
        .status()
        .expect("go is installed (Go >= 1.26)");
    assert!(status.success(), "building tests/go/sdk failed");
    out
}

/// Runs the SDK client as the SPIRE identity `who` against `url`: (exit status, stdout, stderr).
fn sdk(spire: &Spire, bin: &PathBuf, who: &str, url: &str, args: &[&str]) -> (i32, String, String) {
    let out = spire
        .command_as(spire.uid(who), bin)
        .args(args)
        .env("SPIKE_NEXUS_API_URL", url)
        .env("SPIKE_TRUST_ROOT", TD)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spikes_go_sdk_gets_the_answers_spike_gives() {
    let Some(spire) = Spire::shared() else { return };
    let bin = sdk_client();
    let mut c = Cluster::with_spire(&spire, 3);
    let n = c.start_nexus(&[]);
    let anon = c.anonymous();
    let nexus_url = c.nexus[n].url();
    let key_id = wait_status(&anon, &nexus_url, "ready").await["key_id"].clone();
    let url = nexus_url.to_string().trim_end_matches('/').to_string();

    // Secrets, policies and the cipher, as the superuser.
    let (code, out, err) = sdk(&spire, &bin, "superuser", &url, &["superuser"]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}\n{}", c.dump_logs());
    assert!(out.contains(r#"{"superuser":"ok"}"#), "{out}");

    // A workload is refused what the superuser may do.
    let (code, _, err) = sdk(&spire, &bin, "app-one", &url, &["superuser"]);
    assert_ne!(
        code, 0,
        "a workload without policies passed the superuser run"
    );
    assert!(err.contains("FAIL"), "{err}");

    // Recover as the recover operator, lose every Keeper, restore as the restore operator.
    let (code, out, err) = sdk(&spire, &bin, "recover", &url, &["recover"]);
    assert_eq!(code, 0, "{err}");
    let shards: std::collections::BTreeMap<String, String> =
        serde_json::from_str(out.trim()).unwrap();
    assert_eq!(shards.len(), 3, "{out}");
    c.nexus[n].kill();
    for k in c.keepers.iter_mut() {
        k.restart();
    }
    c.nexus[n].restart();
    wait_status(&anon, &nexus_url, "awaiting_restore").await;
    let mut last = String::new();
    for (index, hex) in shards.iter().take(2) {
        let (code, out, err) = sdk(&spire, &bin, "restore", &url, &["restore", index, hex]);
        assert_eq!(code, 0, "{err}");
        last = out;
    }
    let status: serde_json::Value = serde_json::from_str(last.trim()).unwrap();
    assert_eq!(status["restored"], true, "{status}");
    let health = wait_status(&anon, &nexus_url, "ready").await;
    assert_eq!(health["key_id"], key_id);
    assert!(!c.dump_logs().contains("panicked"));
}
