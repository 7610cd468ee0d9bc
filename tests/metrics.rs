#![allow(clippy::unwrap_used)] // tests fail loudly on purpose
//! Prometheus metrics (issue 17.1) on real processes: Nexus and Keepers serve them on
//! `SPIKE_NEXUS_METRICS_ADDR` / `SPIKE_KEEPER_METRICS_ADDR` over plain HTTP; every scrape is
//! parsed by the official Python client's parsers (Prometheus text and OpenMetrics) and linted
//! by `promtool check metrics`; counters move by exactly the traffic the test sent; no label
//! carries a secret path, a SPIFFE ID or a value; the listener answers before the root key is
//! loaded; store errors are counted by backend while an S3 store is away; a busy metrics
//! address stops the process with a clear error. The shipped scrape configuration and alerting
//! rules pass `promtool check config`, `check rules` and the unit tests of
//! `tests/prometheus/alerts_test.yml`. The tools come from scripts/prometheus-tools.sh.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use hyper::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The Python client's interpreter and promtool, installed on first use.
struct Tools {
    python: String,
    promtool: String,
}

fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Tools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let out = Command::new(format!("{ROOT}/scripts/prometheus-tools.sh"))
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(out.status.success(), "scripts/prometheus-tools.sh failed");
        let text = String::from_utf8(out.stdout).unwrap();
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in {text}"))
                .to_string()
        };
        Tools {
            python: get("PROM_PYTHON="),
            promtool: get("PROMTOOL="),
        }
    })
}

/// Runs `program args` with `input` on stdin; returns (success, stdout, stderr).
fn run_with_input(program: &str, args: &[&str], input: &str) -> (bool, String, String) {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(ROOT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One parsed sample.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

/// Every sample of a scrape, as the Python client's parser for `format` reads it.
fn parse(format: &str, text: &str) -> Vec<Sample> {
    let (ok, out, err) = run_with_input(
        &tools().python,
        &[&format!("{ROOT}/tests/prometheus/parse.py"), format],
        text,
    );
    assert!(ok, "the {format} parser refused the scrape: {err}\n{text}");
    out.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Sample {
                name: v["name"].as_str().unwrap().to_string(),
                labels: serde_json::from_value(v["labels"].clone()).unwrap(),
                value: v["value"].as_f64().unwrap(),
            }
        })
        .collect()
}

/// The samples of one scrape, looked up by name and labels.
struct Scrape {
    samples: Vec<Sample>,
    raw: String,
}

impl Scrape {
    /// The value of the sample `name` whose labels include `labels`; the sum when several
    /// match; `None` when none does.
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    /// [`Scrape::find`], 0 when absent (a counter not yet created).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels).unwrap_or(0.0)
    }
}

/// GETs `path` from `addr` over plain HTTP/1.1; returns the status line's code, the
/// Content-Type and the body.
async fn http_get(addr: SocketAddr, path: &str, accept: Option<&str>) -> (u16, String, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw))
        .await
        .expect("the metrics listener answers within 10 s")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    (status, content_type, body.to_string())
}

/// Scrapes `addr` in both formats, checks each with its parser (and the text one with
/// `promtool check metrics`), and returns the Prometheus-text samples. The raw text of both is
/// kept for the label scan.
async fn scrape(addr: SocketAddr) -> Scrape {
    let (status, ctype, text) = http_get(addr, "/metrics", None).await;
    assert_eq!(status, 200, "{text}");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let (status, ctype, om) = http_get(
        addr,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
    )
    .await;
    assert_eq!(status, 200, "{om}");
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(om.ends_with("# EOF\n"), "{om}");
    let open_samples = parse("openmetrics", &om);
    assert!(!open_samples.is_empty());
    let (ok, out, err) = run_with_input(&tools().promtool, &["check", "metrics"], &text);
    assert!(ok, "promtool check metrics: {out}{err}\n{text}");
    Scrape {
        samples: parse("text", &text),
        raw: format!("{text}\n{om}"),
    }
}

/// The metrics address a process logged (`serving metrics at http://ADDR/metrics`).
async fn metrics_addr(proc: &Proc) -> SocketAddr {
    wait_for(
        &format!("{} to log its metrics address", proc.name),
        Duration::from_secs(20),
        || async {
            proc.logs()
                .split("serving metrics at http://")
                .nth(1)
                .and_then(|rest| rest.split('/').next())
                .and_then(|a| a.parse().ok())
        },
    )
    .await
}

const KEEPER_METRICS: (&str, &str) = ("SPIKE_KEEPER_METRICS_ADDR", "127.0.0.1:0");
const NEXUS_METRICS: (&str, &str) = ("SPIKE_NEXUS_METRICS_ADDR", "127.0.0.1:0");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_with_the_traffic_sent_and_no_label_names_a_path_or_an_identity() {
    let mut c = Cluster::with_keeper_env(3, &[KEEPER_METRICS]);
    let n = c.start_nexus(&[NEXUS_METRICS]);
    let url = c.nexus[n].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    for i in 0..3 {
        wait_for("keeper shard", Duration::from_secs(10), || {
            c.keeper_shard(i)
        })
        .await;
    }
    let nexus = metrics_addr(&c.nexus[n]).await;
    // Every Keeper got its shard from the push: wait until Nexus has counted each push.
    let before = wait_for("every push counted", Duration::from_secs(10), || async {
        let s = scrape(nexus).await;
        (1..=3)
            .all(|k| s.get("spike_nexus_keeper_shard_ok", &[("keeper", &k.to_string())]) == 1.0)
            .then_some(s)
    })
    .await;

    // Each server's own SVID: held, and expiring after now (read from the certificate).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let keeper = scrape(metrics_addr(&c.keepers[0]).await).await;
    for (role, s) in [("nexus", &before), ("keeper", &keeper)] {
        assert_eq!(
            s.get(&format!("spike_{role}_svid_ready"), &[]),
            1.0,
            "{role}"
        );
        let expiry = s.get(&format!("spike_{role}_svid_expiry_timestamp_seconds"), &[]);
        assert!(
            expiry > now && expiry < now + 400.0 * 86400.0,
            "{role}: {expiry}"
        );
    }

    // Known traffic: N puts and M gets by a superuser, one get refused to a workload that no
    // policy names, one request for an unknown route, and one connection that is not TLS.
    const N: usize = 5;
    const M: usize = 3;
    let path = "metrics-test/very-secret-path-4d1f";
    let value = "hunter2-value-9c3e";
    let workload_id = "/workload/metrics-probe-7a2b";
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    let wl = c.api_client("wl", workload_id);
    for i in 0..N {
        let (s, b) = call(
            &su,
            &url,
            SECRETS_PATH,
            json!({"path": path, "values": {"v": format!("{value}-{i}")}}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    for _ in 0..M {
        let (s, b) = call(
            &su,
            &url,
            &action(SECRETS_PATH, "get"),
            json!({"path": path}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    let (s, _) = call(
        &wl,
        &url,
        &action(SECRETS_PATH, "get"),
        json!({"path": path}),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = call(&su, &url, &format!("{SECRETS_PATH}/{path}"), json!({})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let mut raw = tokio::net::TcpStream::connect(c.nexus[n].addr)
        .await
        .unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let _ = raw.read_to_end(&mut Vec::new()).await;

    let after = wait_for(
        "the refused handshake counted",
        Duration::from_secs(10),
        || async {
            let s = scrape(nexus).await;
            (s.get(
                "spike_nexus_connections_refused_total",
                &[("cause", "handshake_failed")],
            ) > before.get(
                "spike_nexus_connections_refused_total",
                &[("cause", "handshake_failed")],
            ))
            .then_some(s)
        },
    )
    .await;
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.get(name, labels) - before.get(name, labels);
    let req = "spike_nexus_requests_total";
    let put = [("route", "secrets"), ("action", "secret.put")];
    let get = [("route", "secrets"), ("action", "secret.get")];
    assert_eq!(delta(req, &[put[0], put[1], ("status", "200")]), N as f64);
    assert_eq!(delta(req, &[get[0], get[1], ("status", "200")]), M as f64);
    assert_eq!(delta(req, &[get[0], get[1], ("status", "401")]), 1.0);
    assert_eq!(
        delta(
            req,
            &[("route", "none"), ("action", "none"), ("status", "400")]
        ),
        1.0
    );
    let latency = "spike_nexus_request_duration_seconds_count";
    assert_eq!(delta(latency, &put), N as f64);
    assert_eq!(delta(latency, &get), (M + 1) as f64);
    assert!(delta("spike_nexus_request_duration_seconds_sum", &put) > 0.0);
    assert_eq!(
        delta(
            "spike_nexus_connections_refused_total",
            &[("cause", "handshake_failed")]
        ),
        1.0
    );
    assert!(delta("spike_nexus_connections_accepted_total", &[]) >= 4.0);
    // Every put is one element of one group-commit batch.
    assert_eq!(
        delta("spike_nexus_group_commit_batch_size_sum", &[]),
        N as f64
    );
    // Each put wrote the record once; each read of it is a store get.
    let store = |op: &str, result: &str| {
        delta(
            "spike_store_operations_total",
            &[("backend", "sqlite"), ("op", op), ("result", result)],
        )
    };
    assert!(store("put", "ok") >= N as f64, "{}", after.raw);
    assert!(store("get", "ok") >= (N + M) as f64, "{}", after.raw);
    assert_eq!(
        store("get", "unavailable") + store("put", "unavailable"),
        0.0
    );
    assert!(
        delta(
            "spike_store_operation_duration_seconds_count",
            &[("backend", "sqlite"), ("op", "put")]
        ) >= N as f64
    );
    // One audit line per request with a caller: the puts, the gets, the refused get and the
    // unknown route.
    assert_eq!(
        delta(
            "spike_nexus_audit_records_total",
            &[("sink", "stderr"), ("result", "written")]
        ),
        (N + M + 2) as f64
    );
    assert_eq!(
        after.get("spike_nexus_audit_sink_healthy", &[("sink", "stderr")]),
        1.0
    );
    // Root-key state and since when.
    assert_eq!(
        after.get("spike_nexus_root_key_state", &[("state", "ready")]),
        1.0
    );
    assert_eq!(
        after.get(
            "spike_nexus_root_key_state",
            &[("state", "awaiting_keepers")]
        ),
        0.0
    );
    let since = after.get("spike_nexus_root_key_state_since_timestamp_seconds", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        since > now - 120.0 && since <= now + 1.0,
        "{since} vs {now}"
    );
    // Keepers reachable, holding the right shard, and the pushes that put it there.
    for k in ["1", "2", "3"] {
        assert_eq!(after.get("spike_nexus_keeper_up", &[("keeper", k)]), 1.0);
        assert_eq!(
            after.get("spike_nexus_keeper_shard_ok", &[("keeper", k)]),
            1.0
        );
        assert!(
            after.get(
                "spike_nexus_shard_pushes_total",
                &[("keeper", k), ("result", "ok")]
            ) >= 1.0
        );
    }
    // Build info.
    let build = after
        .samples
        .iter()
        .find(|s| s.name == "spike_build_info")
        .expect("spike_build_info");
    assert_eq!(build.labels["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(build.labels["shard_derivation"], "rejection_sampling");
    assert!(!build.labels["commit"].is_empty());

    // The Keepers' own metrics.
    for (i, keeper) in c.keepers.iter().enumerate() {
        let s = scrape(metrics_addr(keeper).await).await;
        assert_eq!(s.get("spike_keeper_shard_held", &[]), 1.0, "{}", s.raw);
        assert_eq!(s.get("spike_keeper_shard_index", &[]), (i + 1) as f64);
        assert!(
            s.get(
                "spike_keeper_requests_total",
                &[("route", "contribute"), ("status", "200")]
            ) >= 1.0
        );
        assert!(s.get("spike_keeper_shard_contributions_total", &[]) >= 1.0);
        assert!(s.find("spike_build_info", &[]).is_some());
        assert_no_request_data(&s.raw, &[path, value, workload_id, "/spike/pilot"]);
    }
    assert_no_request_data(
        &after.raw,
        &[
            path,
            "very-secret",
            value,
            workload_id,
            "/spike/pilot",
            "spiffe://",
        ],
    );
    // Labels are few: a bounded set however many paths were written.
    let names: std::collections::BTreeSet<&str> =
        after.samples.iter().map(|s| s.name.as_str()).collect();
    assert!(after.samples.len() < 600, "{} samples", after.samples.len());
    assert!(names.contains("spike_nexus_connections_open"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_errors_are_counted_by_backend_while_the_store_is_away() {
    let mut c = Cluster::new(3);
    let s3 = common::s3::S3Server::start(&c.dir.path().join("s3"));
    let mut env = s3.nexus_env("metrics-test/");
    env.push((NEXUS_METRICS.0.into(), NEXUS_METRICS.1.into()));
    let n = c.start_nexus(&pairs(&env));
    let url = c.nexus[n].url();
    wait_status(&c.anonymous(), &url, "ready").await;
    let addr = metrics_addr(&c.nexus[n]).await;
    let su = c.api_client("su", "/spike/pilot/role/superuser");
    let body = json!({"path": "metrics/s3", "values": {"v": "1"}});
    assert_eq!(
        call(&su, &url, SECRETS_PATH, body.clone()).await.0,
        StatusCode::OK
    );
    let before = scrape(addr).await;
    let unavailable = [("backend", "s3"), ("result", "unavailable")];
    assert_eq!(
        before.get("spike_store_operations_total", &unavailable),
        0.0
    );
    assert!(
        before.get(
            "spike_store_operations_total",
            &[("backend", "s3"), ("result", "ok")]
        ) > 0.0
    );

    // The store goes away: a put fails with 503 and the store errors are counted.
    s3.stop();
    let (s, _) = call(&su, &url, SECRETS_PATH, body.clone()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let during = scrape(addr).await;
    assert!(
        during.get("spike_store_operations_total", &unavailable) >= 1.0,
        "{}",
        during.raw
    );
    assert_eq!(
        during.get(
            "spike_nexus_requests_total",
            &[("action", "secret.put"), ("status", "503")]
        ),
        1.0
    );

    // Back: writes succeed again and the error count stops growing.
    s3.restart();
    wait_for(
        "a put after the store returns",
        Duration::from_secs(30),
        || async {
            (call(&su, &url, SECRETS_PATH, body.clone()).await.0 == StatusCode::OK).then_some(())
        },
    )
    .await;
    let after = scrape(addr).await;
    let errors = after.get("spike_store_operations_total", &unavailable);
    assert!(call(&su, &url, SECRETS_PATH, body.clone()).await.0 == StatusCode::OK);
    assert_eq!(
        scrape(addr)
            .await
            .get("spike_store_operations_total", &unavailable),
        errors
    );
}

/// No text of a request (secret path, value, caller identity) anywhere in a scrape.
fn assert_no_request_data(raw: &str, forbidden: &[&str]) {
    for f in forbidden {
        assert!(!raw.contains(f), "the scrape contains {f:?}:\n{raw}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_answer_while_the_root_key_is_not_loaded() {
    // Three Keepers that are not there: Nexus waits for them.
    let mut c = Cluster::new(0);
    let peers: Vec<String> = (0..3)
        .map(|_| format!("https://127.0.0.1:{}", unused_port()))
        .collect();
    let peers = peers.join(",");
    let n = c.start_nexus(&[
        NEXUS_METRICS,
        ("SPIKE_NEXUS_KEEPER_PEERS", &peers),
        ("SPIKE_NEXUS_SHAMIR_SHARES", "3"),
    ]);
    let anon = c.anonymous();
    wait_status(&anon, &c.nexus[n].url(), "awaiting_keepers").await;
    let addr = metrics_addr(&c.nexus[n]).await;
    let s = scrape(addr).await;
    assert_eq!(
        s.get(
            "spike_nexus_root_key_state",
            &[("state", "awaiting_keepers")]
        ),
        1.0,
        "{}",
        s.raw
    );
    assert_eq!(
        s.get("spike_nexus_root_key_state", &[("state", "ready")]),
        0.0
    );
    for k in ["1", "2", "3"] {
        assert_eq!(s.find("spike_nexus_keeper_up", &[("keeper", k)]), Some(0.0));
        assert_eq!(
            s.find("spike_nexus_keeper_shard_ok", &[("keeper", k)]),
            Some(0.0)
        );
    }
    // The health checks that found it not ready are counted (503).
    assert!(
        s.get(
            "spike_nexus_requests_total",
            &[("route", "health"), ("status", "503")]
        ) >= 1.0
    );
    // The store answered the verifier reads.
    assert!(
        s.get(
            "spike_store_operations_total",
            &[("backend", "sqlite"), ("op", "get"), ("result", "ok")]
        ) >= 1.0
    );
    // Anything but GET /metrics is refused.
    assert_eq!(http_get(addr, "/health", None).await.0, 404);
    assert_eq!(http_get(addr, "/metrics/x", None).await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_or_bad_metrics_address_stops_the_process_with_a_clear_error() {
    let c = Cluster::new(0);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let keeper_svid = c.pki.issue("keeper-x", "/spike/keeper/1");
    let nexus_env = |var_value: &str| {
        c.nexus_env(&[
            ("SPIKE_NEXUS_METRICS_ADDR", var_value),
            ("SPIKE_NEXUS_KEEPER_PEERS", "https://127.0.0.1:1"),
            ("SPIKE_NEXUS_SHAMIR_SHARES", "1"),
            ("SPIKE_NEXUS_SHAMIR_THRESHOLD", "1"),
        ])
    };
    let keeper_env = |var_value: &str| {
        server_env(
            &keeper_svid,
            &[
                ("SPIKE_KEEPER_TLS_PORT", "127.0.0.1:0"),
                ("SPIKE_KEEPER_METRICS_ADDR", var_value),
            ],
        )
    };
    // (command, environment, variable, exit status, words of the message)
    type Case<'a> = (&'a str, HashMap<String, String>, &'a str, i32, &'a str);
    let cases: Vec<Case> = vec![
        (
            "nexus",
            nexus_env(&busy_addr),
            "SPIKE_NEXUS_METRICS_ADDR",
            1,
            "cannot listen for metrics",
        ),
        (
            "keeper",
            keeper_env(&busy_addr),
            "SPIKE_KEEPER_METRICS_ADDR",
            1,
            "cannot listen for metrics",
        ),
        (
            "nexus",
            nexus_env("localhost:metrics"),
            "SPIKE_NEXUS_METRICS_ADDR",
            2,
            "not a listen address",
        ),
        (
            "keeper",
            keeper_env("9x"),
            "SPIKE_KEEPER_METRICS_ADDR",
            2,
            "not a listen address",
        ),
    ];
    for (i, (cmd, env, var, want, words)) in cases.into_iter().enumerate() {
        let mut p = Proc::launch(&format!("{cmd}-{i}"), c.dir.path(), &[cmd], env);
        let code = p.wait_exit(Duration::from_secs(20));
        let logs = p.logs();
        assert_eq!(code, Some(want), "{cmd} with a bad {var}:\n{logs}");
        let last = logs.lines().last().unwrap_or_default();
        assert!(
            last.contains(var) && last.contains(words),
            "{cmd}: the last line should name {var} and say {words:?}: {last}"
        );
        if want == 1 {
            assert!(
                last.contains(&busy_addr) && last.contains("in use"),
                "{last}"
            );
        }
        assert!(!logs.contains("listening on"), "{logs}");
    }
    drop(busy);
}

#[test]
fn the_shipped_scrape_config_and_alert_rules_pass_promtool() {
    let t = tools();
    let run = |args: &[&str]| {
        let out = Command::new(&t.promtool)
            .args(args)
            .current_dir(ROOT)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    for args in [
        &["check", "config", "packaging/prometheus/scrape.yml"][..],
        &["check", "rules", "packaging/prometheus/alerts.yml"][..],
        &["test", "rules", "tests/prometheus/alerts_test.yml"][..],
    ] {
        let (ok, text) = run(args);
        assert!(ok, "promtool {args:?}:\n{text}");
    }
    // The rules cover what the issue asks for.
    let rules =
        std::fs::read_to_string(PathBuf::from(ROOT).join("packaging/prometheus/alerts.yml"))
            .unwrap();
    for alert in [
        "SpikeNexusNotReady",
        "SpikeKeeperDown",
        "SpikeStoreErrors",
        "SpikeAuditSinkFailing",
        "SpikeRecoveryShardsNotExported",
    ] {
        assert!(rules.contains(&format!("alert: {alert}")), "{alert}");
    }
    // And the rule tests can fail: a rule file whose alert expression is wrong fails them.
    let dir = tempfile::tempdir().unwrap();
    let broken = rules.replace(
        "expr: spike_nexus_audit_sink_healthy == 0",
        "expr: spike_nexus_audit_sink_healthy == 2",
    );
    assert_ne!(broken, rules);
    std::fs::create_dir_all(dir.path().join("packaging/prometheus")).unwrap();
    std::fs::create_dir_all(dir.path().join("tests/prometheus")).unwrap();
    std::fs::write(dir.path().join("packaging/prometheus/alerts.yml"), broken).unwrap();
    std::fs::copy(
        PathBuf::from(ROOT).join("tests/prometheus/alerts_test.yml"),
        dir.path().join("tests/prometheus/alerts_test.yml"),
    )
    .unwrap();
    let out = Command::new(&t.promtool)
        .args(["test", "rules", "tests/prometheus/alerts_test.yml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "a broken rule passed its tests");
}
