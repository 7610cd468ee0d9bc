//! The benchmark's transport limit: spike's own HTTPS server loop (mutual TLS, HTTP/1.1) with a
//! handler that answers a fixed 120-byte JSON body — no identity check, no policy, no store,
//! no crypto beyond TLS. `cargo run --release --example bare_mtls -- ADDR SVID_DIR`.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use spike::transport::{Handler, Limits, Peer};

/// 120 bytes of JSON.
const BODY: &str = r#"{"data":{"password":"0123456789abcdef0123456789abcdef","username":"bench-user-000000000"},"version":1,"pad":"xxxxxxxxx"}"#;

struct Fixed;

impl Handler for Fixed {
    async fn handle(&self, _req: Request<Incoming>, _peer: Peer) -> Response<Full<Bytes>> {
        spike::transport::bytes(StatusCode::OK, "application/json", BODY.as_bytes().to_vec())
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let addr: std::net::SocketAddr = args.next().expect("ADDR").parse().expect("ADDR");
    let dir = args.next().expect("SVID_DIR");
    let source = spike::identity::SvidSource::load(
        spike::identity::SvidPaths::resolve(Some(dir.into()), None, None, None).expect("svid"),
    )
    .expect("svid");
    let tls =
        spike::identity::server_config(&source, "spike.ist", spike::identity::ClientAuth::Optional)
            .expect("tls");
    let (listener, bound) = spike::transport::bind(addr).await.expect("bind");
    eprintln!("bare mTLS server listening on {bound}");
    spike::transport::serve(
        listener,
        tls,
        Arc::new(Fixed),
        Limits::default(),
        spike::shutdown_signal(),
    )
    .await;
}
