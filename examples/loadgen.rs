//! The benchmark's load generator: N keep-alive HTTPS/1.1 connections, each sending one
//! request after another for a fixed time, with client certificates and SPIFFE or CA
//! verification of the server. Prints one line of JSON: requests/s, p50, p99, errors.
//!
//! `cargo run --release --example loadgen -- --url https://127.0.0.1:8553 --path /v1/store/secrets?action=get \
//!     --body '{"path":"bench/s"}' --svid DIR --ca ca.pem --connections 32 --seconds 10`
//!
//! `--header K:V` adds a header (OpenBao's token), `--method GET` changes the method,
//! `--expect 200` sets the status that counts as success.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;

struct Args {
    url: hyper::Uri,
    path: String,
    method: hyper::Method,
    body: String,
    headers: Vec<(String, String)>,
    svid: Option<String>,
    ca: String,
    connections: usize,
    seconds: f64,
    expect: u16,
}

fn args() -> Args {
    let mut a = Args {
        url: "https://127.0.0.1:8553".parse().expect("static URL"),
        path: "/health".into(),
        method: hyper::Method::POST,
        body: String::new(),
        headers: Vec::new(),
        svid: None,
        ca: String::new(),
        connections: 32,
        seconds: 5.0,
        expect: 200,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => a.url = v.parse().expect("--url"),
            "--path" => a.path = v,
            "--method" => a.method = v.parse().expect("--method"),
            "--body" => a.body = v,
            "--header" => {
                let (k, val) = v.split_once(':').expect("--header K:V");
                a.headers.push((k.trim().into(), val.trim().into()));
            }
            "--svid" => a.svid = Some(v),
            "--ca" => a.ca = v,
            "--connections" => a.connections = v.parse().expect("--connections"),
            "--seconds" => a.seconds = v.parse().expect("--seconds"),
            "--expect" => a.expect = v.parse().expect("--expect"),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

#[tokio::main]
async fn main() {
    let a = Arc::new(args());
    let roots: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(&a.ca)
        .expect("--ca")
        .map(|c| c.expect("CA PEM"))
        .collect();
    let source = a.svid.as_ref().map(|dir| {
        spike::identity::SvidSource::load(
            spike::identity::SvidPaths::resolve(Some(dir.into()), None, None, None).expect("svid"),
        )
        .expect("svid")
    });
    // Any server identity of the trust domain, or none (plain CA verification for OpenBao).
    let tls = spike::identity::client_config(
        source.as_ref(),
        Some(roots),
        "spike.ist",
        spike::identity::ExpectedPeer::Any,
    )
    .expect("tls");
    let connector = tokio_rustls::TlsConnector::from(tls);
    let deadline = Instant::now() + Duration::from_secs_f64(a.seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..a.connections {
        let (a, connector) = (Arc::clone(&a), connector.clone());
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            let host = a.url.host().unwrap_or("127.0.0.1").to_string();
            let port = a.url.port_u16().unwrap_or(443);
            'conn: while Instant::now() < deadline {
                let Ok(tcp) = tokio::net::TcpStream::connect((host.as_str(), port)).await else {
                    errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let name = rustls::pki_types::ServerName::try_from(host.clone()).expect("name");
                let Ok(stream) = connector.connect(name, tcp).await else {
                    errors += 1;
                    continue;
                };
                let Ok((mut send, conn)) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
                else {
                    errors += 1;
                    continue;
                };
                tokio::spawn(conn);
                while Instant::now() < deadline {
                    let mut req = Request::builder()
                        .method(a.method.clone())
                        .uri(a.path.as_str())
                        .header("host", host.as_str())
                        .header("content-type", "application/json");
                    for (k, v) in &a.headers {
                        req = req.header(k.as_str(), v.as_str());
                    }
                    let req = req
                        .body(Full::new(Bytes::from(a.body.clone())))
                        .expect("request");
                    let started = Instant::now();
                    match send.send_request(req).await {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            let ok = resp.into_body().collect().await.is_ok();
                            if ok && status == a.expect {
                                lat.push(started.elapsed());
                            } else {
                                errors += 1;
                            }
                        }
                        Err(_) => {
                            errors += 1;
                            continue 'conn;
                        }
                    }
                }
            }
            (lat, errors)
        });
    }
    let mut all = Vec::new();
    let mut errors = 0;
    while let Some(r) = tasks.join_next().await {
        let (lat, e) = r.expect("task");
        all.extend(lat);
        errors += e;
    }
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    println!(
        "{{\"rps\":{:.0},\"p50_ms\":{:.2},\"p99_ms\":{:.2},\"ok\":{},\"errors\":{}}}",
        all.len() as f64 / a.seconds,
        pct(0.50),
        pct(0.99),
        all.len(),
        errors
    );
}
