#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! The client commands (`spike secret|policy|cipher`) as real processes against a real cluster:
//! output formats, exit statuses and the messages a person reads. DESIGN.md §6 (clients), §7.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A ready cluster and the SVIDs of the callers the tests act as.
struct Setup {
    c: Cluster,
    url: String,
    superuser: PathBuf,
}

async fn setup() -> Setup {
    let mut c = Cluster::new(3);
    let n = c.start_nexus(&[]);
    wait_status(&c.anonymous(), &c.nexus[n].url(), "ready").await;
    let superuser = c.pki.issue("superuser", "/spike/pilot/role/superuser");
    let url = c.nexus[n]
        .url()
        .to_string()
        .trim_end_matches('/')
        .to_string();
    Setup { c, url, superuser }
}

impl Setup {
    /// Runs `spike ARGS` as the identity in `svid`.
    fn run_as(&self, svid: &Path, args: &[&str]) -> (i32, String, String) {
        run_spike(args, &client_env(&self.url, svid))
    }

    /// Runs `spike ARGS` as the superuser and requires success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.run_as(&self.superuser, args);
        assert_eq!(
            code,
            0,
            "spike {args:?} failed: {err}\n{}",
            self.c.dump_logs()
        );
        out
    }

    /// Runs `spike ARGS` as the superuser and requires exit 1; returns stderr.
    fn fails(&self, svid: &Path, args: &[&str]) -> String {
        let (code, out, err) = self.run_as(svid, args);
        assert_eq!(
            code, 1,
            "spike {args:?}: expected exit 1, got {code}: {out}{err}"
        );
        assert!(out.is_empty(), "nothing on stdout on error: {out}");
        err
    }
}

/// Timestamps replaced by `<time>`, runs of spaces by one (column widths follow the times).
fn mask(text: &str) -> String {
    let time = regex::Regex::new(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z").unwrap();
    let spaces = regex::Regex::new(r" {2,}").unwrap();
    spaces
        .replace_all(&time.replace_all(text, "<time>"), " ")
        .into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_put_get_versions_delete_undelete_metadata_and_list() {
    let s = setup().await;
    let err = {
        let (code, _, err) = s.run_as(
            &s.superuser,
            &["secret", "put", "secrets/db", "user=admin", "pass=s3=cr=t"],
        );
        assert_eq!(code, 0, "{err}");
        err
    };
    assert_eq!(err, "wrote secrets/db version 1\n");
    s.ok(&["secret", "put", "secrets/db", "user=admin", "pass=second"]);
    let out = s.ok(&[
        "secret",
        "put",
        "secrets/db",
        "user=root",
        "pass=third",
        "--format",
        "json",
    ]);
    assert_eq!(out, "{\"version\":3}\n");

    // Text output: sorted KEY=VALUE lines; a single key's value as is.
    assert_eq!(
        s.ok(&["secret", "get", "secrets/db"]),
        "pass=third\nuser=root\n"
    );
    assert_eq!(
        s.ok(&["secret", "get", "secrets/db", "--version", "1"]),
        "pass=s3=cr=t\nuser=admin\n"
    );
    assert_eq!(
        s.ok(&["secret", "get", "secrets/db", "pass", "--version", "2"]),
        "second"
    );
    let json: serde_json::Value =
        serde_json::from_str(&s.ok(&["secret", "get", "secrets/db", "--format", "json"])).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"data": {"pass": "third", "user": "root"}, "version": 3})
    );
    let err = s.fails(&s.superuser, &["secret", "get", "secrets/db", "nokey"]);
    assert_eq!(err, "spike: secrets/db version 3 has no key \"nokey\"\n");

    // Check-and-set.
    let err = s.fails(
        &s.superuser,
        &["secret", "put", "secrets/db", "a=b", "--cas", "2"],
    );
    assert_eq!(
        err,
        "spike: secrets/db is not at version 2 (check-and-set failed)\n"
    );
    let err = s.fails(
        &s.superuser,
        &["secret", "put", "secrets/db", "a=b", "--cas", "0"],
    );
    assert_eq!(
        err,
        "spike: secrets/db already exists (check-and-set with --cas 0 failed)\n"
    );
    s.ok(&["secret", "put", "secrets/new", "a=b", "--cas", "0"]);
    s.ok(&[
        "secret",
        "put",
        "secrets/db",
        "user=root",
        "pass=fourth",
        "--cas",
        "3",
    ]);

    // Delete chosen versions, then undelete one of them.
    let (code, _, err) = s.run_as(
        &s.superuser,
        &["secret", "delete", "secrets/db", "--versions", "1,2"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(err, "deleted secrets/db versions 1,2\n");
    let err = s.fails(
        &s.superuser,
        &["secret", "get", "secrets/db", "--version", "1"],
    );
    assert_eq!(err, "spike: secrets/db version 1 not found\n");
    assert_eq!(s.ok(&["secret", "get", "secrets/db", "pass"]), "fourth");
    s.ok(&["secret", "undelete", "secrets/db", "--versions", "2"]);
    assert_eq!(
        s.ok(&["secret", "get", "secrets/db", "pass", "--version", "2"]),
        "second"
    );
    // Deleting the current version falls back to the highest live one.
    s.ok(&["secret", "delete", "secrets/db"]);
    assert_eq!(s.ok(&["secret", "get", "secrets/db", "pass"]), "third");

    let meta = mask(&s.ok(&["secret", "metadata", "secrets/db"]));
    assert_eq!(
        meta,
        "path secrets/db\n\
         current version 3\n\
         oldest version 2\n\
         max versions 10\n\
         created <time>\n\
         updated <time>\n\
         \n\
         VERSION CREATED DELETED\n\
         1 <time> <time>\n\
         2 <time> -\n\
         3 <time> -\n\
         4 <time> <time>\n"
    );
    let json: serde_json::Value =
        serde_json::from_str(&s.ok(&["secret", "metadata", "secrets/db", "--format", "json"]))
            .unwrap();
    assert_eq!(json["metadata"]["currentVersion"], 3);
    assert!(json["versions"]["1"]["deletedTime"].is_string(), "{json}");
    assert!(json["versions"]["2"]["deletedTime"].is_null(), "{json}");

    let err = s.fails(&s.superuser, &["secret", "get", "secrets/nothing"]);
    assert_eq!(err, "spike: secrets/nothing not found\n");

    // List, with and without a prefix.
    s.ok(&["secret", "put", "apps/web/key", "k=v"]);
    assert_eq!(
        s.ok(&["secret", "list"]),
        "apps/web/key\nsecrets/db\nsecrets/new\n"
    );
    assert_eq!(
        s.ok(&["secret", "list", "secrets/"]),
        "secrets/db\nsecrets/new\n"
    );
    assert_eq!(s.ok(&["secret", "list", "nope/"]), "");
    let json: serde_json::Value =
        serde_json::from_str(&s.ok(&["secret", "list", "apps", "--format", "json"])).unwrap();
    assert_eq!(json, serde_json::json!({"keys": ["apps/web/key"]}));
    // An invalid path is Nexus's call: exit 1 with what to check.
    let err = s.fails(&s.superuser, &["secret", "put", "bad//path", "a=b"]);
    assert!(
        err.starts_with("spike: Nexus at https://127.0.0.1:"),
        "{err}"
    );
    assert!(
        err.contains("rejected the request as invalid (api_bad_request): check the path"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_decide_what_workloads_may_do() {
    let s = setup().await;
    let web = s.c.pki.issue("web", "/app/web");
    let api = s.c.pki.issue("api", "/app/api");
    s.ok(&["secret", "put", "secrets/web/db", "pass=w"]);
    s.ok(&["secret", "put", "secrets/api/db", "pass=a"]);

    // Before any policy: refused, with who, what and where.
    let err = s.fails(&web, &["secret", "get", "secrets/web/db"]);
    assert_eq!(
        err,
        "spike: no policy grants spiffe://spike.ist/app/web read on secrets/web/db (access_unauthorized)\n"
    );

    // create: anchored patterns, no warning.
    let (code, out, err) = s.run_as(
        &s.superuser,
        &[
            "policy",
            "create",
            "--name",
            "web",
            "--spiffeid-pattern",
            "^spiffe://spike\\.ist/app/web$",
            "--path-pattern",
            "^secrets/web/.*$",
            "--permissions",
            "read,list",
        ],
    );
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (0, "", "saved policy web\n")
    );
    assert_eq!(s.ok(&["secret", "get", "secrets/web/db"]), "pass=w\n");
    assert_eq!(
        s.run_as(&web, &["secret", "get", "secrets/web/db"]).1,
        "pass=w\n"
    );
    let err = s.fails(&web, &["secret", "put", "secrets/web/db", "pass=x"]);
    assert_eq!(
        err,
        "spike: no policy grants spiffe://spike.ist/app/web write on secrets/web/db (access_unauthorized)\n"
    );
    let err = s.fails(&web, &["secret", "get", "secrets/api/db"]);
    assert!(
        err.contains("app/web read on secrets/api/db (access_unauthorized)"),
        "{err}"
    );
    // list shows the workload only what it may list.
    assert_eq!(s.run_as(&web, &["secret", "list"]).1, "secrets/web/db\n");
    // A workload with no policy at all.
    let err = s.fails(&api, &["secret", "list"]);
    assert_eq!(
        err,
        "spike: no policy grants spiffe://spike.ist/app/api list on spike/system/secret (access_unauthorized)\n"
    );
    // Workloads may not manage policies.
    let err = s.fails(&web, &["policy", "list"]);
    assert!(
        err.contains("app/web list on spike/system/acl (access_unauthorized)"),
        "{err}"
    );

    // apply from YAML (unanchored: warned) and from JSON.
    let yaml = s.c.dir.path().join("api.yaml");
    std::fs::write(
        &yaml,
        "name: api\nspiffeidPattern: spiffe://spike.ist/app/api\npathPattern: ^secrets/api/.*$\npermissions:\n  - read\n  - write\n",
    )
    .unwrap();
    let (code, _, err) = s.run_as(
        &s.superuser,
        &["policy", "apply", "--file", yaml.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        err,
        "spike: warning: the spiffeid pattern \"spiffe://spike.ist/app/api\" is not anchored, so it \
         matches every SPIFFE ID that contains a match; write ^...$ to match whole values\n\
         saved policy api\n"
    );
    s.run_as(&api, &["secret", "put", "secrets/api/db", "pass=b"]);
    assert_eq!(
        s.run_as(&api, &["secret", "get", "secrets/api/db", "pass"])
            .1,
        "b"
    );
    let json_file = s.c.dir.path().join("ops.json");
    std::fs::write(
        &json_file,
        r#"{"name":"ops","spiffeidPattern":"^spiffe://spike\\.ist/ops/.*$","pathPattern":"^ops/.*$","permissions":["read","write","list"]}"#,
    )
    .unwrap();
    s.ok(&["policy", "apply", "--file", json_file.to_str().unwrap()]);

    // get / list output.
    assert_eq!(
        mask(&s.ok(&["policy", "get", "web"])),
        "name: web\n\
         spiffeid pattern: ^spiffe://spike\\.ist/app/web$\n\
         path pattern: ^secrets/web/.*$\n\
         permissions: read,list\n\
         created: <time>\n\
         updated: <time>\n"
    );
    assert_eq!(
        s.ok(&["policy", "list"]),
        "NAME  PERMISSIONS      SPIFFEID-PATTERN               PATH-PATTERN\n\
         api   read,write       spiffe://spike.ist/app/api     ^secrets/api/.*$\n\
         ops   read,write,list  ^spiffe://spike\\.ist/ops/.*$   ^ops/.*$\n\
         web   read,list        ^spiffe://spike\\.ist/app/web$  ^secrets/web/.*$\n"
    );
    let json: serde_json::Value =
        serde_json::from_str(&s.ok(&["policy", "get", "ops", "--format", "json"])).unwrap();
    assert_eq!(json["spiffiedPattern"], "^spiffe://spike\\.ist/ops/.*$");
    assert_eq!(
        json["permissions"],
        serde_json::json!(["read", "write", "list"])
    );
    let json: serde_json::Value = serde_json::from_str(&s.ok(&[
        "policy",
        "list",
        "--format",
        "json",
        "--path-pattern",
        "^ops/.*$",
    ]))
    .unwrap();
    assert_eq!(json["policies"].as_array().unwrap().len(), 1, "{json}");
    assert_eq!(json["policies"][0]["name"], "ops");

    // delete: the workload loses access at once (no cache).
    let (code, _, err) = s.run_as(&s.superuser, &["policy", "delete", "web"]);
    assert_eq!((code, err.as_str()), (0, "deleted policy web\n"));
    let err = s.fails(&web, &["secret", "get", "secrets/web/db"]);
    assert!(err.contains("(access_unauthorized)"), "{err}");
    let err = s.fails(&s.superuser, &["policy", "get", "web"]);
    assert_eq!(err, "spike: policy web not found\n");
    assert_eq!(
        s.ok(&["policy", "delete", "ops", "--format", "json"])
            .trim(),
        "{}"
    );
    let err = s.fails(&s.superuser, &["policy", "delete", "web"]);
    assert_eq!(err, "spike: policy web not found\n");
}

fn run_with_stdin(s: &Setup, svid: &Path, args: &[&str], stdin: &[u8]) -> (i32, Vec<u8>, String) {
    run_spike_with_stdin(args, &client_env(&s.url, svid), stdin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cipher_round_trips_binary_data_through_files_and_pipes() {
    let s = setup().await;
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 256) as u8).collect();
    let dir = s.c.dir.path();
    let (plain, sealed, opened) = (
        dir.join("plain.bin"),
        dir.join("sealed.bin"),
        dir.join("opened.bin"),
    );
    std::fs::write(&plain, &data).unwrap();

    s.ok(&[
        "cipher",
        "encrypt",
        "--in",
        plain.to_str().unwrap(),
        "--out",
        sealed.to_str().unwrap(),
    ]);
    let ct = std::fs::read(&sealed).unwrap();
    assert_eq!(ct[0], 2, "version byte");
    assert_eq!(ct.len(), 1 + 12 + 4 + data.len() + 16);
    s.ok(&[
        "cipher",
        "decrypt",
        "--in",
        sealed.to_str().unwrap(),
        "--out",
        opened.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&opened).unwrap(), data);

    // stdin → stdout, both ways.
    let (code, ct, err) = run_with_stdin(&s, &s.superuser, &["cipher", "encrypt"], &data);
    assert_eq!(code, 0, "{err}");
    let (code, pt, err) = run_with_stdin(&s, &s.superuser, &["cipher", "decrypt"], &ct);
    assert_eq!(code, 0, "{err}");
    assert_eq!(pt, data);

    // JSON mode.
    let (code, json, err) = run_with_stdin(
        &s,
        &s.superuser,
        &["cipher", "encrypt", "--format", "json"],
        b"hello",
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(v["version"], 2);
    let (code, out, err) = run_with_stdin(
        &s,
        &s.superuser,
        &["cipher", "decrypt", "--format", "json"],
        &json,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "{\"plaintext\":\"aGVsbG8=\"}\n"
    );

    // A tampered ciphertext and an unauthorised caller fail with exit 1.
    let mut bad = ct.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let (code, out, err) = run_with_stdin(&s, &s.superuser, &["cipher", "decrypt"], &bad);
    assert_eq!((code, out.len()), (1, 0), "{err}");
    assert!(
        err.contains("not a ciphertext from `spike cipher encrypt`"),
        "{err}"
    );
    let web = s.c.pki.issue("web", "/app/web");
    let (code, _, err) = run_with_stdin(&s, &web, &["cipher", "encrypt"], b"x");
    assert_eq!(code, 1);
    assert_eq!(
        err,
        "spike: no policy grants spiffe://spike.ist/app/web execute on spike/system/cipher/exec (access_unauthorized)\n"
    );
}

#[test]
fn usage_errors_exit_2_and_unreachable_nexus_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), TD);
    let svid = pki.issue("superuser", "/spike/pilot/role/superuser");
    let (a, b) = (unused_port(), unused_port());
    let urls = format!("https://127.0.0.1:{a},https://127.0.0.1:{b}");
    let env = client_env(&urls, &svid);

    let usage = |args: &[&str], env: &[(&str, &str)]| {
        let (code, out, err) = run_spike(args, env);
        assert_eq!(code, 2, "spike {args:?}: {out}{err}");
        assert!(out.is_empty(), "{out}");
        err
    };
    let err = usage(&["secret", "put", "secrets/db", "user=a", "hunter2"], &env);
    assert_eq!(
        err,
        "spike: value argument 2 has no '=': give KEY=VALUE pairs (not echoed: it may be a secret)\n"
    );
    usage(&["secret", "put", "secrets/db"], &env);
    usage(&["secret", "get"], &env);
    usage(&["secret", "frobnicate"], &env);
    usage(&["secret", "get", "p", "--format", "yaml"], &env);
    let err = usage(&["secret", "delete", "p", "--versions", "1,x"], &env);
    assert!(err.contains("\"x\" is not a version number"), "{err}");
    let err = usage(
        &[
            "policy",
            "create",
            "--name",
            "n",
            "--spiffeid-pattern",
            "^spiffe://spike.ist/a$",
            "--path-pattern",
            "^a$",
            "--permissions",
            "read,admin",
        ],
        &env,
    );
    assert_eq!(
        err,
        "spike: invalid permission \"admin\": expected read, write, list, execute or super\n"
    );
    let err = usage(&["policy", "apply", "--file", "/nonexistent/p.yaml"], &env);
    assert!(
        err.starts_with("spike: cannot read /nonexistent/p.yaml"),
        "{err}"
    );
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "name: x\npermissions: [read]\n").unwrap();
    let err = usage(&["policy", "apply", "--file", bad.to_str().unwrap()], &env);
    assert!(err.contains("spiffeidPattern"), "{err}");
    // No SVID configured: say what to set.
    let err = usage(&["secret", "get", "p"], &[("SPIKE_NEXUS_API_URL", &urls)]);
    assert!(
        err.starts_with("spike: no identity source: SPIFFE_ENDPOINT_SOCKET is unset"),
        "{err}"
    );
    assert!(err.contains("or SPIKE_SVID_DIR to a directory"), "{err}");
    let err = usage(
        &["secret", "get", "p"],
        &[
            ("SPIKE_NEXUS_API_URL", "http://x:1"),
            ("SPIKE_SVID_DIR", svid.to_str().unwrap()),
        ],
    );
    assert!(err.contains("SPIKE_NEXUS_API_URL"), "{err}");

    // Nobody listening: exit 1, naming every URL tried, for reads and writes alike.
    for args in [&["secret", "get", "p"][..], &["secret", "put", "p", "a=b"]] {
        let (code, out, err) = run_spike(args, &env);
        assert_eq!(code, 1, "{out}{err}");
        assert!(
            err.starts_with(&format!(
                "spike: cannot reach Nexus (tried https://127.0.0.1:{a}, https://127.0.0.1:{b}; set SPIKE_NEXUS_API_URL): connect to 127.0.0.1:{a} failed"
            )),
            "{err}"
        );
        assert!(
            err.contains(&format!("connect to 127.0.0.1:{b} failed")),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_fail_over_past_unreachable_and_not_ready_instances() {
    let mut s = setup().await;
    // A second Nexus on the same store whose Keepers are all unreachable: 503 state_not_ready.
    let dead = format!(
        "https://127.0.0.1:{},https://127.0.0.1:{},https://127.0.0.1:{}",
        unused_port(),
        unused_port(),
        unused_port()
    );
    let m = s.c.start_nexus(&[("SPIKE_NEXUS_KEEPER_PEERS", &dead)]);
    let not_ready = s.c.nexus[m]
        .url()
        .to_string()
        .trim_end_matches('/')
        .to_string();
    let closed = format!("https://127.0.0.1:{}", unused_port());

    let only_bad = format!("{closed},{not_ready}");
    let (code, _, err) = run_spike(&["secret", "list"], &client_env(&only_bad, &s.superuser));
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err,
        format!(
            "spike: Nexus at {not_ready} has no root key yet (waiting for Keepers or a restore); try again shortly\n"
        )
    );
    s.url = format!("{closed},{not_ready},{}", s.url);
    s.ok(&["secret", "put", "secrets/failover", "a=b"]);
    assert_eq!(s.ok(&["secret", "get", "secrets/failover"]), "a=b\n");
}
