//! The HTTPS client used by Nexus (to reach Keepers) and by the CLI (to reach Nexus).
//!
//! One request per connection: Keeper traffic is a handful of requests per interval and a CLI
//! command makes one call, so a pool would only add state. Every address a host name resolves
//! to is tried in turn; a failure before the request was written is reported as
//! [`Error::Unsent`], the only kind a caller may retry for a non-idempotent request.
//! [`HttpsClient::resolve`] and [`HttpsClient::request_to`] expose the two halves, so a caller
//! that fails over (as `crate::client::NexusClient` does) can also move on from an address that
//! answers `503`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Nothing was sent: the name did not resolve, no address accepted a connection, or the
    /// TLS handshake failed. Safe to retry anywhere.
    #[error("cannot reach {url}: {reason}")]
    Unsent {
        /// The address tried.
        url: String,
        /// Why the connection or handshake failed.
        reason: String,
    },
    /// The request may have reached the server but no complete answer came back.
    #[error("no answer from {url}: {reason}")]
    NoAnswer {
        /// The address tried.
        url: String,
        /// Why no answer came.
        reason: String,
    },
}

/// Result of a request.
pub type Result<T> = std::result::Result<T, Error>;

/// A response: status and the whole body.
#[derive(Debug)]
pub struct Reply {
    /// The HTTP status.
    pub status: StatusCode,
    /// The body, at most `Timeouts::max_response` bytes.
    pub body: Bytes,
}

/// Timeouts and limits of one client.
#[derive(Clone, Debug)]
pub struct Timeouts {
    /// TCP connect to one address: how long a dead address can hold a caller up.
    pub connect: Duration,
    /// TLS handshake once connected. Apart from `connect` because behind a TCP load balancer a
    /// connection is accepted at once and the handshake waits for the balancer to find a
    /// live server.
    pub handshake: Duration,
    /// From the first byte written to the last byte of the response.
    pub request: Duration,
    /// Largest response body accepted.
    pub max_response: usize,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(3),
            handshake: Duration::from_secs(10),
            request: Duration::from_secs(30),
            max_response: 64 << 20,
        }
    }
}

/// An HTTPS client over mutual TLS, one request per connection.
#[derive(Clone)]
pub struct HttpsClient {
    tls: TlsConnector,
    timeouts: Timeouts,
    /// Addresses for host names, consulted before the system resolver (like curl's
    /// `--resolve`): lets tests give a name several addresses without editing `/etc/hosts`.
    hosts: Option<Arc<HashMap<String, Vec<IpAddr>>>>,
}

impl HttpsClient {
    /// A client with this TLS configuration and these timeouts.
    pub fn new(tls: Arc<rustls::ClientConfig>, timeouts: Timeouts) -> HttpsClient {
        HttpsClient {
            tls: TlsConnector::from(tls),
            timeouts,
            hosts: None,
        }
    }

    /// The same client resolving the names in `hosts` to the given addresses, in that order.
    pub fn with_hosts(self, hosts: HashMap<String, Vec<IpAddr>>) -> HttpsClient {
        HttpsClient {
            hosts: Some(Arc::new(hosts)),
            ..self
        }
    }

    /// Its timeouts.
    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// Every address `base`'s host resolves to, in the resolver's order. An IP literal is its
    /// own address.
    pub async fn resolve(&self, base: &Uri) -> Result<Vec<SocketAddr>> {
        let unsent = |reason: String| Error::Unsent {
            url: base.to_string().trim_end_matches('/').to_string(),
            reason,
        };
        let host = bare_host(base).ok_or_else(|| unsent("URL has no host".into()))?;
        let port = base.port_u16().unwrap_or(443);
        if let Some(ips) = self.hosts.as_ref().and_then(|h| h.get(&host)) {
            return Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect());
        }
        let addrs: Vec<SocketAddr> = tokio::time::timeout(
            self.timeouts.connect,
            tokio::net::lookup_host((host.as_str(), port)),
        )
        .await
        .map_err(|_| unsent("name resolution timed out".into()))?
        .map_err(|e| unsent(format!("cannot resolve {host}: {e}")))?
        .collect();
        if addrs.is_empty() {
            return Err(unsent(format!("{host} resolved to no address")));
        }
        Ok(addrs)
    }

    /// `POST base + path` to one of `base`'s addresses, without trying any other.
    pub async fn post_to(
        &self,
        base: &Uri,
        addr: SocketAddr,
        path: &str,
        content_type: &'static str,
        body: Vec<u8>,
    ) -> Result<Reply> {
        self.request_to(
            Method::POST,
            base,
            addr,
            path,
            Some((content_type, Bytes::from(body))),
        )
        .await
    }

    /// `POST base + path` with a JSON body.
    pub async fn post_json(&self, base: &Uri, path: &str, body: Vec<u8>) -> Result<Reply> {
        self.request(
            Method::POST,
            base,
            path,
            Some(("application/json", Bytes::from(body))),
        )
        .await
    }

    /// `POST base + path` with a JSON body that holds key material: the one buffer is shared
    /// by every attempt and wiped when the last reference to it is dropped (hyper's own write
    /// buffers, if it copies into them, are not).
    pub async fn post_json_secret(
        &self,
        base: &Uri,
        path: &str,
        body: zeroize::Zeroizing<Vec<u8>>,
    ) -> Result<Reply> {
        self.request(
            Method::POST,
            base,
            path,
            Some(("application/json", Bytes::from_owner(body))),
        )
        .await
    }

    /// `POST base + path` with any body and content type.
    pub async fn post(
        &self,
        base: &Uri,
        path: &str,
        content_type: &'static str,
        body: Vec<u8>,
    ) -> Result<Reply> {
        self.request(
            Method::POST,
            base,
            path,
            Some((content_type, Bytes::from(body))),
        )
        .await
    }

    /// `GET base + path`.
    pub async fn get(&self, base: &Uri, path: &str) -> Result<Reply> {
        self.request(Method::GET, base, path, None).await
    }

    /// Sends to the first of `base`'s addresses that accepts a connection.
    async fn request(
        &self,
        method: Method,
        base: &Uri,
        path: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> Result<Reply> {
        let mut last = None;
        for addr in self.resolve(base).await? {
            match self
                .request_to(method.clone(), base, addr, path, body.clone())
                .await
            {
                Err(e @ Error::Unsent { .. }) => last = Some(e),
                other => return other,
            }
        }
        // resolve() returns at least one address, so an error was recorded.
        Err(last.unwrap_or_else(|| Error::Unsent {
            url: base.to_string(),
            reason: "no address".into(),
        }))
    }

    /// Sends one request to `addr`, one of `base`'s addresses.
    pub async fn request_to(
        &self,
        method: Method,
        base: &Uri,
        addr: SocketAddr,
        path: &str,
        body: Option<(&'static str, Bytes)>,
    ) -> Result<Reply> {
        let url = format!("{}{path}", base.to_string().trim_end_matches('/'));
        let unsent = |reason: String| Error::Unsent {
            url: url.clone(),
            reason,
        };
        let host = bare_host(base).ok_or_else(|| unsent("URL has no host".into()))?;
        let authority = base
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_else(|| host.clone());
        let tcp = match tokio::time::timeout(self.timeouts.connect, TcpStream::connect(addr)).await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(unsent(format!("connect to {addr} failed: {e}"))),
            Err(_) => return Err(unsent(format!("connect to {addr} timed out"))),
        };
        let _ = tcp.set_nodelay(true);
        let stream = match tokio::time::timeout(
            self.timeouts.handshake,
            self.tls.connect(server_name(&host), tcp),
        )
        .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return Err(unsent(format!("TLS handshake with {addr} failed: {e}"))),
            Err(_) => return Err(unsent(format!("TLS handshake with {addr} timed out"))),
        };

        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unsent(format!("HTTP handshake failed: {e}")))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, authority);
        let payload = match body {
            Some((content_type, bytes)) => {
                builder = builder.header(CONTENT_TYPE, content_type);
                bytes
            }
            None => Bytes::new(),
        };
        let req = builder
            .body(Full::new(payload))
            .map_err(|e| unsent(format!("invalid request: {e}")))?;
        let no_answer = |reason: String| Error::NoAnswer {
            url: url.clone(),
            reason: format!("{reason} (from {addr})"),
        };
        let max = self.timeouts.max_response;
        let exchange = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| no_answer(e.to_string()))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), max)
                .collect()
                .await
                .map_err(|e| no_answer(format!("reading the response failed: {e}")))?
                .to_bytes();
            Ok(Reply { status, body })
        };
        let result = tokio::time::timeout(self.timeouts.request, exchange)
            .await
            .unwrap_or_else(|_| Err(no_answer("timed out waiting for the response".into())));
        driver.abort();
        result
    }
}

/// The host of a URL without IPv6 brackets.
fn bare_host(base: &Uri) -> Option<String> {
    Some(
        base.host()?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    )
}

/// The TLS server name for a host. SPIFFE verification ignores it (identity comes from the URI
/// SAN), but rustls needs one; a host that is not a valid DNS name gets a placeholder.
fn server_name(host: &str) -> ServerName<'static> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return ServerName::IpAddress(ip.into());
    }
    ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| ServerName::try_from("spike.invalid").expect("static valid DNS name"))
}
