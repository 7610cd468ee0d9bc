//! The benchmark's transport baseline: a bare hyper + rustls (ring) mTLS server that verifies
//! the client certificate against a CA and answers every request with the same 120-byte JSON
//! body. No routing, no store, no crypto beyond TLS — what the machine can do for one HTTPS
//! request with a client certificate. Built by `bench/run.sh`; not part of the `spike` binary.
//!
//!   bare-mtls ADDR CA_PEM CERT_PEM KEY_PEM
//!
//! Prints `listening on ADDR` once bound (ADDR may use port 0).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Response;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// 120 bytes, shaped like a small secret read.
const BODY: &[u8; 120] = br#"{"data":{"password":"s3cret-s3cret-s3cret","username":"admin-admin-admin"},"versions":{"1":{"version":1}},"err":"pad12"}"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, ca, cert, key] = args.as_slice() else {
        eprintln!("usage: bare-mtls ADDR CA_PEM CERT_PEM KEY_PEM");
        std::process::exit(2);
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(addr.as_str()).await?;
        println!("listening on {}", listener.local_addr()?);
        loop {
            let (tcp, _) = listener.accept().await?;
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        // Read the request body, as a real server would.
                        let _ = req.into_body().collect().await;
                        let mut resp = Response::new(Full::new(Bytes::from_static(BODY)));
                        resp.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    })
}
